"""
The training loss over the lm_head on CPU, a few hundred rows at a time: logits = softcap * tanh(x W^T / softcap),
cross-entropy against the targets (ignore_index -1), without ever holding the (tokens x vocab) logits.

Why: at the CPU-demo shape the logits are hundreds of MB, and the passes over them (softcap, log-softmax, their
backward, fresh allocations) are bound by memory traffic. Here each chunk of rows is computed, turned into its loss
*and* its gradient while it sits in cache, and pushed through the two backward matmuls at once; backward only
scales the stored gradients (the trick of Liger-kernel's Triton fused linear cross-entropy, which has no CPU path).
Same math and the same matmul FLOPs; less time and peak memory per step (dev/PERF.md, "CPU training loss").

The gradients are computed in the forward pass, so this is only used when a backward is expected to follow with
a uniform upstream gradient: reductions "mean" and "sum" (chat_sft sums token losses). With reduction "none" and
autograd on, GPT.forward keeps the full-logits path; without autograd every reduction is chunked (val bpb).

COMPILE_ELEMENTWISE (set by base_train / chat_sft when they torch.compile the model): fuse each chunk's
elementwise work (tanh, log-sum-exp, softmax gradient) into one inductor kernel per chunk shape, faster than
eager. Off by default: every new chunk shape costs a few seconds of compilation.
"""

import torch

CHUNK_ROWS = 512  # 16 MB of fp32 logits at vocab 8192: a chunk stays in cache (the best size measured, dev/PERF.md)
COMPILE_ELEMENTWISE = False


def _loss_and_grad(z, targets, softcap):
    """z: (rows, V) fp32 raw logits. Returns the per-row losses and dLoss_row/dz (zero for ignored rows)."""
    valid = targets != -1
    safe = targets.clamp_min(0)
    t = torch.tanh(z * (1.0 / softcap))
    logits = t * softcap
    lse = torch.logsumexp(logits, dim=-1)
    losses = (lse - logits.gather(1, safe[:, None])[:, 0]) * valid
    onehot = torch.arange(z.size(1), device=z.device)[None, :] == safe[:, None]
    grad = (torch.exp(logits - lse[:, None]) - onehot.to(z.dtype)) * (1.0 - t * t) * valid[:, None]
    return losses, grad


_compiled_loss_and_grad = None


def _elementwise(z, targets, softcap):
    global _compiled_loss_and_grad
    if not COMPILE_ELEMENTWISE:
        return _loss_and_grad(z, targets, softcap)
    if _compiled_loss_and_grad is None:
        _compiled_loss_and_grad = torch.compile(_loss_and_grad, dynamic=False)
    return _compiled_loss_and_grad(z, targets, softcap)


class _SoftcapCrossEntropy(torch.autograd.Function):
    """Summed loss of all rows; the gradients are made in forward, chunk by chunk, and scaled in backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, chunk_rows):
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        w = weight.to(x.dtype)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.size(0), chunk_rows):
            xs = x[start:start + chunk_rows]
            losses, grad = _elementwise(torch.mm(xs, w.t()).float(), targets[start:start + chunk_rows], softcap)
            total += losses.sum()
            grad = grad.to(x.dtype)
            torch.mm(grad, w, out=grad_x[start:start + chunk_rows])
            grad_weight.add_(torch.mm(grad.t(), xs))
        ctx.save_for_backward(grad_x, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_weight = ctx.saved_tensors
        return (grad_x * grad_total.to(grad_x.dtype), (grad_weight * grad_total).to(ctx.weight_dtype),
                None, None, None)


def _row_losses(x, weight, targets, softcap, chunk_rows):
    """Per-row losses without autograd; 0 for ignored rows, as F.cross_entropy(reduction='none')."""
    w = weight.to(x.dtype)
    out = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
    for start in range(0, x.size(0), chunk_rows):
        ys = targets[start:start + chunk_rows]
        logits = torch.mm(x[start:start + chunk_rows], w.t()).float().div_(softcap).tanh_().mul_(softcap)
        picked = logits.gather(1, ys.clamp_min(0)[:, None])[:, 0]
        out[start:start + chunk_rows] = (torch.logsumexp(logits, dim=-1) - picked).masked_fill_(ys == -1, 0.0)
    return out


_eager_loss = None


def use_chunked_loss(x, reduction):
    """Where GPT.forward takes this path: CPU activations, and a reduction the gradient-in-forward trick serves
    (any reduction without autograd). GPUs keep the full-logits loss, which torch.compile fuses there."""
    return x.device.type == "cpu" and (reduction != "none" or not torch.is_grad_enabled())


def softcapped_cross_entropy(x, weight, targets, softcap, reduction="mean", chunk_rows=CHUNK_ROWS):
    """F.cross_entropy(softcap * tanh(x @ weight.T / softcap), targets, ignore_index=-1, reduction=reduction)
    for x (N, C), weight (V, C), targets (N,), in row chunks. With autograd on only "mean" and "sum"."""
    if not torch.compiler.is_compiling():
        return _softcapped_cross_entropy(x, weight, targets, softcap, reduction, chunk_rows)
    # Under a compiled model: a graph break, the loss runs eagerly with its own kernels. The disable wrapper is
    # made here, not as a decorator at import, because it imports torch._dynamo: seconds of start-up for every
    # process that merely loads a model (chat_cli, the server). Making it inside the trace is a graph break too.
    global _eager_loss
    if _eager_loss is None:
        _eager_loss = torch.compiler.disable(_softcapped_cross_entropy)
    return _eager_loss(x, weight, targets, softcap, reduction, chunk_rows)


def _softcapped_cross_entropy(x, weight, targets, softcap, reduction, chunk_rows):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if needs_grad:
        if reduction == "none":
            raise ValueError("the chunked loss makes its gradients in forward and needs a 'mean' or 'sum' reduction")
        total = _SoftcapCrossEntropy.apply(x, weight, targets, softcap, chunk_rows)
    else:
        losses = _row_losses(x, weight, targets, softcap, chunk_rows)
        if reduction == "none":
            return losses
        total = losses.sum()
    if reduction == "sum":
        return total
    return total / (targets != -1).sum()  # nan when every target is ignored, like F.cross_entropy
