"""
FP8 training for the big Linears (CUDA, H100-class GPUs): tensorwise dynamic scaling, the same API as the part
of torchao.float8 that base_train uses:

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                               module_filter_fn=lambda module, fqn: ...)

Every selected nn.Linear becomes a Float8Linear (same parameters, so optimizers and checkpoints are
unchanged). Its three GEMMs run through torch._scaled_mm:
    forward       out    = x  @ W.T      x, W in e4m3 (more mantissa), fast accumulation
    backward      grad_x = gy @ W        gy in e5m2 (more range) ...
                  grad_W = gy.T @ x      ... exact accumulation for gradients
Each operand gets one scale per tensor, scale = fp8_max / amax (computed in float64 so eager and compiled
numerics agree), values saturate instead of overflowing. The fp8 copies are what is saved for backward.

cuBLAS wants the first operand row-major and the second column-major, every dim divisible by 16;
`fp8_module_filter` keeps small layers (ve_gate, smear_gate) in bf16.

For training: `enable_fp8_training(model, recipe, device_type)` converts (torchao for recipes other than
tensorwise), and `with disable_fp8(model):` evaluates in bf16 on the same weights.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from nanochat.common import print0
from nanochat.gpt import Linear

AMAX_EPS = 1e-12  # an all-zero tensor gets a finite scale


@dataclass
class Float8LinearConfig:
    recipe: str = "tensorwise"

    @classmethod
    def from_recipe_name(cls, name):
        if name != "tensorwise":
            raise ValueError(f"nanochat.fp8 implements the 'tensorwise' recipe only, not {name!r}; "
                             f"use --fp8-recipe tensorwise (or install torchao for other recipes)")
        return cls(recipe=name)


def quantize(x, fp8_dtype):
    """(x in fp8, inverse scale): x_fp8 * inverse_scale ~= x, one scale for the whole tensor."""
    fp8_max = torch.finfo(fp8_dtype).max
    amax = x.detach().abs().max().double().clamp(min=AMAX_EPS)
    scale = (fp8_max / amax).float()
    x_fp8 = (x.detach().float() * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return x_fp8, scale.reciprocal()


def _col_major(x):
    return x.t().contiguous().t()


class _Float8Matmul(torch.autograd.Function):
    """y = x @ W.T for 2-D x with all three GEMMs in fp8."""

    @staticmethod
    def forward(ctx, x, weight):
        x_fp8, x_inv = quantize(x, torch.float8_e4m3fn)
        w_fp8, w_inv = quantize(weight, torch.float8_e4m3fn)
        ctx.save_for_backward(x_fp8, x_inv, w_fp8, w_inv)
        ctx.weight_dtype = weight.dtype
        # w_fp8 is (N, K) row-major, so its transpose is already column-major
        return torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x.dtype,
                                use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out):
        x_fp8, x_inv, w_fp8, w_inv = ctx.saved_tensors
        g_fp8, g_inv = quantize(grad_out, torch.float8_e5m2)
        grad_x = torch._scaled_mm(g_fp8, _col_major(w_fp8), scale_a=g_inv, scale_b=w_inv,
                                  out_dtype=grad_out.dtype, use_fast_accum=False)
        grad_w = torch._scaled_mm(g_fp8.t().contiguous(), _col_major(x_fp8), scale_a=g_inv, scale_b=x_inv,
                                  out_dtype=grad_out.dtype, use_fast_accum=False)
        return grad_x, grad_w.to(ctx.weight_dtype)


_float8_matmul = _Float8Matmul.apply


def _register_with_compile():
    """Let torch.compile treat the fp8 matmul as one opaque op. Done at conversion time on CUDA machines only:
    importing torch._dynamo takes seconds, and fp8 training is CUDA-only anyway."""
    global _float8_matmul
    if torch.cuda.is_available() and _float8_matmul is _Float8Matmul.apply:
        from torch import _dynamo
        _float8_matmul = _dynamo.allow_in_graph(_Float8Matmul.apply)


class Float8Linear(Linear):
    """A Linear (no bias) whose matmuls run in fp8; the fp32 master weight is shared with the original."""

    def forward(self, x):
        assert self.bias is None, "Float8Linear supports bias-free Linears only"
        x2d = x.reshape(-1, x.size(-1))
        return _float8_matmul(x2d, self.weight).view(*x.shape[:-1], self.out_features)

    @classmethod
    def from_linear(cls, linear):
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False)
        new.weight = linear.weight
        return new


def convert_to_float8_training(module, config=None, module_filter_fn=None):
    """Swap (in place) every nn.Linear for which module_filter_fn(module, fqn) is true; returns the module."""
    config = config or Float8LinearConfig()
    _register_with_compile()
    for fqn, child in list(module.named_modules()):
        if not fqn or not isinstance(child, nn.Linear) or isinstance(child, Float8Linear):
            continue
        if module_filter_fn is not None and not module_filter_fn(child, fqn):
            continue
        if child.bias is not None:
            raise ValueError(f"{fqn}: Float8Linear supports bias-free Linears only")
        parent_name, _, attr = fqn.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, Float8Linear.from_linear(child))
    return module


# -----------------------------------------------------------------------------
# Training with fp8: convert, and switch back to bf16 for evaluation

def fp8_module_filter(module, fqn):
    """fp8 GEMMs want dims divisible by 16 and big enough to pay off."""
    return (isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
            and min(module.in_features, module.out_features) >= 128)


def enable_fp8_training(model, recipe, device_type):
    """--fp8: convert the big Linears in place (CUDA only; elsewhere a warning and bf16). nanochat's own module
    implements the tensorwise recipe; other recipes come from torchao."""
    if device_type != "cuda":
        print0("WARNING: --fp8 needs a CUDA GPU; ignoring it")
        return
    if recipe == "tensorwise":
        config_cls, convert = Float8LinearConfig, convert_to_float8_training
    else:
        try:
            from torchao.float8 import Float8LinearConfig as config_cls  # optional dependency, only for this recipe
            from torchao.float8 import convert_to_float8_training as convert
        except ImportError:
            raise SystemExit(f"--fp8-recipe {recipe} needs torchao (pip install torchao); "
                             f"nanochat's built-in fp8 supports --fp8-recipe tensorwise") from None
    num_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert(model, config=config_cls.from_recipe_name(recipe), module_filter_fn=fp8_module_filter)
    num_fp8 = sum("Float8" in type(m).__name__ for m in model.modules())
    print0(f"FP8 training ({recipe}): converted {num_fp8}/{num_linear} Linear layers")


@contextmanager
def disable_fp8(model):
    """Temporarily swap Float8Linear modules (ours or torchao's) for plain Linears sharing the same weights
    (bf16 evaluation)."""
    swapped = []
    for name, module in list(model.named_modules()):
        if "Float8" in type(module).__name__:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            linear = Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = module.weight
            setattr(parent, attr, linear)
            swapped.append((parent, attr, module))
    try:
        yield
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)
