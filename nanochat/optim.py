"""
MuonAdamW: one optimizer for the whole model. Matrices (the transformer blocks' weights) go to Muon,
everything else (embeddings, lm_head, per-layer scalars) to AdamW.

The same class runs on one device and under torchrun: when a process group with more than one rank
exists, step() also averages the gradients across ranks (callers never wrap the model in DDP) and
shards the optimizer state ZeRO-2 style; on a single rank all communication is skipped.

Muon, per step, for the stacked matrices of one shape group (after modded-nanogpt and nanochat):
  1. Nesterov momentum in lerp form:  buf <- lerp(buf, g, 1-mu);  g <- lerp(g, buf, mu)
  2. MuonEq row equilibration: every row rescaled to the mean row norm, so the spectrum entering the
     polar iteration is better conditioned (arXiv 2603.28254; nanochat upstream).
  3. Polar Express orthogonalization (arXiv 2505.16932): divide by 1.01*||X||_F + 1e-6, then 5
     quintic iterations with per-iteration coefficients, via X^T X for tall and X X^T for wide
     matrices. Runs in bf16 only when COMPUTE_DTYPE is bf16 (CPU without native bf16 runs fp32).
  4. Muon+ renormalization: Frobenius norm snapped to sqrt(min(rows, cols)), the norm of an exactly
     semi-orthogonal matrix (arXiv 2602.21545; nanochat upstream).
  5. NorMuon variance reduction (arXiv 2510.05491): a factored second moment (one value per row, or
     per column when the matrix is wide), EMA with beta2, rescaling that keeps the update's norm.
  6. Cautious weight decay + update:  p -= lr*g + lr*wd*p*[g*p >= 0],  lr scaled by
     max(1, rows/cols)^0.5 (so c_fc, shape (4C, C), steps 2x).
AdamW: decoupled weight decay, lerp-form moments, bias correction, math in fp32.

Hyperparameters reach the kernels as 0-D CPU tensors, so schedules that change group["lr"],
group["momentum"] or group["weight_decay"] between steps never trigger a recompile. The kernels are
compiled with torch.compile on CUDA only. On CPU, compiling costs tens of seconds per graph and made Muon no
faster (its matmuls dominate), so Muon runs eager and AdamW uses torch's fused CPU AdamW kernel
(dev/PERF.md, "Optimizer").
"""

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.common import COMPUTE_DTYPE

# -----------------------------------------------------------------------------
# Kernels. Plain functions, compiled lazily for CUDA tensors (see _kernel).

# Polar Express coefficients (a, b, c) for 5 iterations (safety factor 2e-2, cushion 2), from the paper.
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]

# AdamW params with fewer elements than this are all-reduced and updated in full on every rank
# (replicated state, but they are the tiny scalars); larger ones are sharded by rows.
ADAMW_SMALL_NUMEL = 1024


def adamw_update(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_t: Tensor, lr_t: Tensor,
                 beta1_t: Tensor, beta2_t: Tensor, eps_t: Tensor, wd_t: Tensor) -> None:
    """One AdamW step in place. exp_avg/exp_avg_sq are fp32; p may be lower precision (wte in bf16),
    so the math runs in fp32 and is cast back once at the end."""
    p32 = p.float()  # the same tensor when p is already fp32
    g32 = grad.float()
    p32.mul_(1 - lr_t * wd_t)  # decoupled weight decay, before the update
    exp_avg.lerp_(g32, 1 - beta1_t)
    exp_avg_sq.lerp_(g32.square(), 1 - beta2_t)
    bias1 = 1 - beta1_t ** step_t
    bias2 = 1 - beta2_t ** step_t
    denom = (exp_avg_sq / bias2).sqrt() + eps_t
    p32.sub_(exp_avg / denom * (lr_t / bias1))
    if p.dtype != torch.float32:  # otherwise p32 is p and the update already landed
        p.copy_(p32)


def polar_express(X: Tensor, ns_steps: int = 5) -> Tensor:
    """Approximate polar factor U V^T of X (..., rows, cols) (singular values pushed towards 1, singular
    vectors kept). Works in X's dtype; the work matrix is the smaller Gram matrix (cols x cols if tall)."""
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    if tall:  # work on X^T: the same iteration with A = X^T X, as A is symmetric
        X = X.mT
    shape = X.shape
    X = X.reshape(-1, shape[-2], shape[-1])
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        # X <- aX + (bA + cA^2) X, A = X X^T. baddbmm folds each scale-and-add into its matmul: one pass over
        # the matrices less than separate ops
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    X = X.view(shape)
    return X.mT if tall else X


def muon_update(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_moment: Tensor,
                momentum_t: Tensor, lr_t: Tensor, wd_t: Tensor, beta2_t: Tensor,
                ns_steps: int, red_dim: int, equilibrate: bool, renormalize: bool) -> None:
    """One Muon step for a stack of same-shape matrices (n, ..., rows, cols), all fp32, in place.
    `grads` is scratch (overwritten). second_moment is (n, ..., rows, 1) with red_dim=-1 or
    (n, ..., 1, cols) with red_dim=-2. lr_t already includes the shape multiplier."""
    rows, cols = grads.size(-2), grads.size(-1)
    # 1. Nesterov momentum
    momentum_buffer.lerp_(grads, 1 - momentum_t)
    g = grads.lerp_(momentum_buffer, momentum_t)
    X = g.bfloat16() if COMPUTE_DTYPE == torch.bfloat16 else g
    # 2. MuonEq: every row to the mean row norm (= ||X||_F / sqrt(rows))
    if equilibrate:
        target = g.norm(dim=(-2, -1), keepdim=True) / rows ** 0.5
        row_norm = g.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        X = X * (target / row_norm).to(X.dtype)
    # 3. Polar Express
    g = polar_express(X, ns_steps).float()
    # 4. Muon+: Frobenius norm of a semi-orthogonal matrix
    if renormalize:
        g = g * (min(rows, cols) ** 0.5 / g.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
    # 5. NorMuon: per-row (or per-column) adaptive scale, total norm preserved
    red_size = g.size(red_dim)
    v_mean = g.square().mean(dim=red_dim, keepdim=True)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_moment.lerp_(v_mean, 1 - beta2_t)
    step_size = second_moment.clamp_min(1e-10).rsqrt()
    v_norm_new = (v_mean * red_size * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10)))
    # 6. Cautious weight decay (only where the update pushes the same way as decay would) + update
    mask = (g * params) >= 0
    params.sub_(lr_t * g + lr_t * wd_t * params * mask)


_fused_adamw_cpu = getattr(torch, "_fused_adamw_", None)


def _adamw_cpu_fused(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int,
                     lr: float, beta1: float, beta2: float, eps: float, wd: float) -> bool:
    """torch's own single-pass CPU AdamW kernel (the one behind torch.optim.AdamW(fused=True)): the same
    math as adamw_update (up to float rounding order) in one pass instead of a dozen eager ops. Only for fp32
    contiguous CPU tensors; returns False when it can't run, so the caller falls back to the eager kernel."""
    tensors = (p, grad, exp_avg, exp_avg_sq)
    if _fused_adamw_cpu is None or any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return False
    try:
        _fused_adamw_cpu([p], [grad], [exp_avg], [exp_avg_sq], [], [torch.tensor(float(step))], lr=lr,
                         beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


_compiled = {}


def _kernel(fn, device: torch.device):
    """torch.compile'd kernel on CUDA (one fused graph, no Python between ops); eager elsewhere.
    AdamW is compiled with automatic dynamic shapes (after the first recompile one graph serves all
    param sizes); Muon with static shapes (a handful of matrix shapes, and matmuls like static shapes)."""
    if device.type != "cuda":
        return fn
    if fn not in _compiled:
        dynamic = None if fn is adamw_update else False
        _compiled[fn] = _CompileOrEager(fn, torch.compile(fn, dynamic=dynamic, fullgraph=True))
    return _compiled[fn]


class _CompileOrEager:
    """Calls the compiled kernel; if compiling fails (no working Triton / C compiler), says so once and
    runs eager from then on. Compilation happens before the kernel touches any tensor, so retrying
    eagerly is safe."""

    def __init__(self, eager, compiled):
        self.eager, self.compiled = eager, compiled

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:  # torch._dynamo / inductor raise many different types here
                if not _is_compile_error(e):
                    raise
                print(f"WARNING: torch.compile of {self.eager.__name__} failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); running it eagerly (slower, same math).")
                self.compiled = None
        return self.eager(*args)


def _is_compile_error(e: Exception) -> bool:
    module = type(e).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor")) or "triton" in str(e).lower()

# -----------------------------------------------------------------------------
# Collectives, with a fallback for backends that lack reduce_scatter or ReduceOp.AVG (gloo in older torch).

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)
_all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def _collective_device():
    """The device collectives run on: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _probe_all_reduce_avg(rank, world_size):
    t = torch.full((1,), float(rank))
    dist.all_reduce(t, op=dist.ReduceOp.AVG)
    return t.item() == (world_size - 1) / 2


def _probe_reduce_scatter_avg(rank, world_size):
    out = torch.zeros(1)
    _reduce_scatter(out, torch.arange(world_size, dtype=torch.float32) + rank, op=dist.ReduceOp.AVG)
    return out.item() == rank + (world_size - 1) / 2


def _probe_all_gather(rank, world_size):
    out = torch.zeros(world_size)
    _all_gather(out, torch.full((1,), float(rank)))
    return torch.equal(out, torch.arange(world_size, dtype=torch.float32))


def _supported(probe, rank, world_size, device):
    """True if a tiny synchronous run of the collective works and gives the right numbers (a backend may refuse
    an op, or accept an op and ignore it, e.g. sum where an average was asked). Every rank runs the same probes."""
    try:
        with torch.device(device):
            works = bool(probe(rank, world_size))
    except (RuntimeError, NotImplementedError, ValueError, TypeError, AttributeError):
        works = False
    ok = torch.tensor(float(works), device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # native only if it worked on every rank
    return bool(ok.item())


class _Pending:
    """An async collective plus the local work to do once it lands (the fallbacks' divide/slice)."""

    def __init__(self, work=None, finish=None):
        self.work, self.finish = work, finish

    def wait(self):
        if self.work is not None:
            self.work.wait()
        if self.finish is not None:
            self.finish()
        self.work = self.finish = None


class _Comm:
    """Averaging reduce-scatter / all-reduce and all-gather along dim 0. The backend's native ops where it has
    them, else fallbacks: all_reduce(SUM) then divide (and slice), list all_gather. Which ops are native is
    probed once, synchronously, when the optimizer is built (every rank runs the same probes in the same order):
    some backends refuse an op when it is called, others (gloo in older torch) only when its work is waited on,
    which an async call in the middle of a step could not recover from."""

    def __init__(self, rank: int, world_size: int, force_fallback: bool = False):
        self.rank, self.world_size = rank, world_size
        probes = {"all_reduce_avg": _probe_all_reduce_avg, "reduce_scatter_avg": _probe_reduce_scatter_avg,
                  "all_gather": _probe_all_gather}
        device = _collective_device()
        self.native = {name: not force_fallback and _supported(probe, rank, world_size, device)
                       for name, probe in probes.items()}
        self.inplace_gather = (not force_fallback) and dist.get_backend() == "nccl"

    def _try(self, name, fn):
        return fn() if self.native[name] else None

    def all_reduce_avg(self, t: Tensor) -> _Pending:
        work = self._try("all_reduce_avg", lambda: dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True))
        if work is not None:
            return _Pending(work)
        work = dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True)
        return _Pending(work, lambda: t.div_(self.world_size))

    def reduce_scatter_avg(self, out: Tensor, inp: Tensor) -> _Pending:
        """out (n, ...) receives the average of rows [rank*n, (rank+1)*n) of inp (world*n, ...).
        inp may be clobbered."""
        work = self._try("reduce_scatter_avg", lambda: _reduce_scatter(out, inp, op=dist.ReduceOp.AVG, async_op=True))
        if work is not None:
            return _Pending(work)
        n = out.size(0)
        work = dist.all_reduce(inp, op=dist.ReduceOp.SUM, async_op=True)
        return _Pending(work, lambda: torch.div(inp[self.rank * n:(self.rank + 1) * n], self.world_size, out=out))

    def all_gather(self, out: Tensor, inp: Tensor) -> _Pending:
        """out (world*n, ...) <- concat of every rank's inp (n, ...). NCCL may alias inp into out;
        other backends get a private copy of inp."""
        # detached: out may be a parameter, and a backend that lands the data from its own thread (gloo in older
        # torch) writes with that thread's grad mode, where autograd forbids in-place writes to no_grad views
        out = out.detach()
        if not self.inplace_gather and inp.data_ptr() >= out.data_ptr() and inp.data_ptr() < out.data_ptr() + out.nbytes:
            inp = inp.clone()
        work = self._try("all_gather", lambda: _all_gather(out, inp, async_op=True))
        if work is not None:
            return _Pending(work, lambda: inp)  # keeps the private copy alive until the gather landed
        return _Pending(dist.all_gather(list(out.chunk(self.world_size)), inp, async_op=True), lambda: inp)

# -----------------------------------------------------------------------------


class MuonAdamW(torch.optim.Optimizer):
    """
    Muon for matrices, AdamW for the rest, with gradient averaging across ranks built in.

    param_groups: list of dicts, each
      {"kind": "adamw", "params", "lr", "betas", "eps", "weight_decay"} or
      {"kind": "muon", "params" (all the same shape, >= 2 dims), "lr", "momentum", "ns_steps", "beta2",
       "weight_decay"}; optional Muon keys "equilibrate" and "renormalize" (default True) switch MuonEq and
      Muon+ off. Any extra keys (e.g. "initial_lr") are kept. Schedules mutate group["lr"],
      group["momentum"], group["weight_decay"] between steps.

    Distributed (torch.distributed initialized with world_size > 1 when the optimizer is built):
      - AdamW params with < 1024 elements, or whose dim 0 doesn't divide by world_size: all_reduce(AVG)
        of the grad, full update on every rank (state replicated).
      - Other AdamW params: reduce_scatter(AVG) along dim 0, update of this rank's rows (state for those
        rows only), all_gather of the param.
      - Muon groups: the K grads are stacked and zero-padded to a multiple of world_size, reduce_scatter
        gives rank r matrices [r*k, (r+1)*k) (k = ceil(K/world_size)), it updates those (state for those
        only), all_gather brings every updated matrix back to every rank.
      Communication is async in three phases: launch every reduce, then per group wait/compute/launch the
      gather, then wait for the gathers. After step() the AdamW p.grad hold averaged (or partly reduced)
      values; zero them as usual.
      A param's grad must be None on all ranks or on none (it is with the same model on every rank).
    State is per rank and its layout depends on world_size: resuming needs the same world size
    (load_state_dict checks). Optimizer state is always fp32, whatever the param dtype.
    """

    def __init__(self, param_groups: list[dict]):
        super().__init__(param_groups, defaults={})
        for group in self.param_groups:
            _check_group(group)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self._comm = _Comm(self.rank, self.world_size)
        else:
            self.rank, self.world_size, self._comm = 0, 1, None
        # 0-D CPU tensors: refilled every step, so new values never recompile the CUDA kernels
        f32 = dict(dtype=torch.float32, device="cpu")
        self._adamw_t = {k: torch.zeros((), **f32) for k in ("step", "lr", "beta1", "beta2", "eps", "wd")}
        self._muon_t = {k: torch.zeros((), **f32) for k in ("momentum", "lr", "wd", "beta2")}

    # ----- layout helpers (shared by step and load_state_dict) -----

    def _adamw_rows(self, p: Tensor):
        """(start, stop) of the rows of p this rank updates, or None when it updates all of p."""
        W = self.world_size
        if W == 1 or p.numel() < ADAMW_SMALL_NUMEL or p.dim() == 0 or p.shape[0] % W != 0:
            return None
        rows = p.shape[0] // W
        return self.rank * rows, (self.rank + 1) * rows

    def _muon_chunk(self, group: dict):
        """(k, start, num_owned): matrices per rank, first owned index, how many of them are real."""
        K = len(group["params"])
        k = -(-K // self.world_size)
        start = self.rank * k
        return k, start, max(0, min(k, K - start))

    def _expected_state_shapes(self, group: dict, p: Tensor, index: int) -> dict:
        if group["kind"] == "adamw":
            rows = self._adamw_rows(p)
            shape = tuple(p.shape) if rows is None else (rows[1] - rows[0], *p.shape[1:])
            return {"exp_avg": shape, "exp_avg_sq": shape}
        if index != 0:
            return {}  # a Muon group's state lives with its first param
        k, _, _ = self._muon_chunk(group)
        shape = tuple(p.shape)
        second = (k, *shape[:-1], 1) if shape[-2] >= shape[-1] else (k, *shape[:-2], 1, shape[-1])
        return {"momentum_buffer": (k, *shape), "second_momentum_buffer": second}

    # ----- step -----

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Phase 1: launch every gradient reduction (nothing to do on a single rank)
        reduced = [self._reduce_muon(g) if g["kind"] == "muon" else self._reduce_adamw(g) for g in self.param_groups]
        # Phase 2: per group, wait for its grads, update, launch the gathers
        gathers = []
        for group, red in zip(self.param_groups, reduced):
            if red is None:
                continue
            if group["kind"] == "muon":
                self._update_muon(group, red, gathers)
            else:
                self._update_adamw(group, red, gathers)
        # Phase 3: wait for the gathers (and copy gathered Muon stacks back into the params)
        for pending in gathers:
            pending.wait()
        return loss

    def _reduce_adamw(self, group: dict):
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if self._comm is None:
                out.append((p, p.grad, None))
                continue
            rows = self._adamw_rows(p)
            grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
            if rows is None:
                out.append((p, grad, self._comm.all_reduce_avg(grad)))
            else:
                grad_slice = torch.empty_like(grad[rows[0]:rows[1]])
                out.append((p, grad_slice, self._comm.reduce_scatter_avg(grad_slice, grad)))
        return out

    def _update_adamw(self, group: dict, items: list, gathers: list):
        t = self._adamw_t
        t["lr"].fill_(group["lr"])
        t["beta1"].fill_(group["betas"][0])
        t["beta2"].fill_(group["betas"][1])
        t["eps"].fill_(group["eps"])
        t["wd"].fill_(group["weight_decay"])
        for p, grad, pending in items:
            if pending is not None:
                pending.wait()
            rows = self._adamw_rows(p)
            p_slice = p if rows is None else p[rows[0]:rows[1]]
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p_slice, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p_slice, dtype=torch.float32)
            state["step"] += 1
            if not (p.device.type == "cpu" and _adamw_cpu_fused(
                    p_slice, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"],
                    group["betas"][0], group["betas"][1], group["eps"], group["weight_decay"])):
                t["step"].fill_(state["step"])
                _kernel(adamw_update, p.device)(p_slice, grad, state["exp_avg"], state["exp_avg_sq"],
                                                t["step"], t["lr"], t["beta1"], t["beta2"], t["eps"], t["wd"])
            if rows is not None:
                gathers.append(self._comm.all_gather(p, p_slice))

    def _reduce_muon(self, group: dict):
        params = group["params"]
        if all(p.grad is None for p in params):
            return None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self._comm is None:
            return torch.stack(grads).float(), None, None
        k, _, _ = self._muon_chunk(group)
        K = len(params)
        stacked = torch.empty(k * self.world_size, *params[0].shape, dtype=grads[0].dtype, device=params[0].device)
        torch._foreach_copy_(list(stacked[:K].unbind(0)), grads)
        stacked[K:].zero_()  # padding: zero matrices ride along harmlessly
        grad_chunk = torch.empty_like(stacked[:k])
        return grad_chunk, stacked, self._comm.reduce_scatter_avg(grad_chunk, stacked)

    def _update_muon(self, group: dict, red: tuple, gathers: list):
        grad_chunk, stacked, pending = red
        if pending is not None:
            pending.wait()
        params = group["params"]
        p0 = params[0]
        k, start, num_owned = self._muon_chunk(group)
        state = self.state[p0]
        if not state:
            for name, shape in self._expected_state_shapes(group, p0, 0).items():
                state[name] = torch.zeros(shape, dtype=torch.float32, device=p0.device)
        rows, cols = p0.shape[-2], p0.shape[-1]
        owned = params[start:start + num_owned]
        if owned:
            t = self._muon_t
            t["momentum"].fill_(group["momentum"])
            t["beta2"].fill_(group["beta2"] if group["beta2"] is not None else 0.0)
            t["lr"].fill_(group["lr"] * max(1.0, rows / cols) ** 0.5)
            t["wd"].fill_(group["weight_decay"])
            stacked_params = torch.stack(owned).float()
            _kernel(muon_update, p0.device)(
                grad_chunk[:num_owned].float(), stacked_params,
                state["momentum_buffer"][:num_owned], state["second_momentum_buffer"][:num_owned],
                t["momentum"], t["lr"], t["wd"], t["beta2"], group["ns_steps"],
                -1 if rows >= cols else -2, bool(group.get("equilibrate", True)), bool(group.get("renormalize", True)))
        if self._comm is None:
            torch._foreach_copy_(params, list(stacked_params.unbind(0)))
            return
        # Every rank sends k matrices (zeros where it owns fewer); the grad stack is reused as the output
        updated = torch.zeros(k, *p0.shape, dtype=p0.dtype, device=p0.device)
        if owned:
            updated[:num_owned].copy_(stacked_params)
        out = stacked if stacked.dtype == p0.dtype else torch.empty_like(stacked, dtype=p0.dtype)
        gather = self._comm.all_gather(out, updated)
        gathers.append(_Pending(None, lambda: (gather.wait(),
                                               torch._foreach_copy_(params, list(out[:len(params)].unbind(0))))))

    # ----- state dict -----

    def state_dict(self):
        sd = super().state_dict()
        sd["world_size"] = self.world_size  # the sharded layout depends on it; load_state_dict checks
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but state tensors are copied (never aliased) and kept fp32 whatever the param
        dtype, and the layout is checked against this run's world size."""
        saved_world = state_dict.get("world_size")
        if saved_world is not None and saved_world != self.world_size:
            raise ValueError(f"This optimizer state was saved by a run with {saved_world} rank(s) but this run has "
                             f"{self.world_size}. Optimizer state is sharded per rank, so resume with the same number "
                             f"of ranks (the model weights alone load at any world size).")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise ValueError("The saved optimizer state has different parameter groups than this model's optimizer "
                             "(different model config?); start the optimizer fresh or load a matching checkpoint.")
        new_state = {}
        for saved, group in zip(saved_groups, self.param_groups):
            for index, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                if pid not in state_dict["state"]:
                    continue
                expected = self._expected_state_shapes(group, p, index)
                entry = {}
                for name, value in state_dict["state"][pid].items():
                    if torch.is_tensor(value):
                        if name in expected and tuple(value.shape) != expected[name]:
                            raise ValueError(
                                f"Optimizer state {name!r} has shape {tuple(value.shape)} but this run expects "
                                f"{expected[name]} (saved with a different world size or model shape?).")
                        value = value.to(device=p.device, dtype=torch.float32 if value.is_floating_point() else value.dtype,
                                         copy=True)
                    entry[name] = value
                new_state[p] = entry
        self.state.clear()
        self.state.update(new_state)
        self.param_groups = [{**saved, "params": group["params"]} for saved, group in zip(saved_groups, self.param_groups)]


def _check_group(group: dict) -> None:
    kind = group.get("kind")
    required = {"adamw": ("lr", "betas", "eps", "weight_decay"),
                "muon": ("lr", "momentum", "ns_steps", "beta2", "weight_decay")}
    if kind not in required:
        raise ValueError(f"MuonAdamW param group has kind={kind!r}; use 'adamw' or 'muon'.")
    missing = [key for key in required[kind] if key not in group]
    if missing:
        raise ValueError(f"MuonAdamW {kind} group is missing {missing}; it needs {list(required[kind])}.")
    if kind == "muon" and group["params"]:
        shape = group["params"][0].shape
        if len(shape) < 2 or any(p.shape != shape for p in group["params"]):
            raise ValueError(f"A Muon group needs matrices that all have one shape (got "
                             f"{sorted(set(tuple(p.shape) for p in group['params']))}); group params by shape.")
    if kind == "muon" and not 1 <= group["ns_steps"] <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"ns_steps must be 1..{len(POLAR_EXPRESS_COEFFS)}, got {group['ns_steps']}.")


# -----------------------------------------------------------------------------
# What every training script does around optimizer.step()

def set_schedule(optimizer, lr_multiplier, muon_momentum, muon_weight_decay=None):
    """Scale every group's LR from its initial_lr; set Muon's momentum (and weight decay when given)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_multiplier
        if group["kind"] == "muon":
            group["momentum"] = muon_momentum
            if muon_weight_decay is not None:
                group["weight_decay"] = muon_weight_decay


def optimizer_step(optimizer, scaler=None, ddp=False):
    """optimizer.step(), through the fp16 GradScaler when there is one. Under DDP every rank must agree on
    skipping a step with inf/NaN gradients, so the found-inf flags are max-reduced before scaler.step."""
    if scaler is None:
        optimizer.step()
        return
    scaler.unscale_(optimizer)
    if ddp:
        for found_inf in scaler._found_inf_per_device(optimizer).values():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
    scaler.step(optimizer)
    scaler.update()
