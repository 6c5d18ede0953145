"""The output head and its cross-entropy in one, a chunk of tokens at a time.

    loss_i = logsumexp_v(h_i . W_v) - h_i . W_{t_i}          h [n, d], W [vocab, d], t [n]

The plain path materialises the logits of every token, in the compute dtype and again in fp32
for the softmax (DeepSeek-V3's 129280-way vocabulary: 2 GiB of fp32 per 4096 tokens, and as much
again for its gradient). Here forward keeps only each token's log-sum-exp; backward recomputes a
chunk's logits, forms its softmax gradient and adds the chunk's share of dh and dW, so no more
than `rows` tokens' logits exist at once. The extra work is one more head GEMM in backward.
"""
from __future__ import annotations

import torch

# fp32 logits of one chunk: 2**28 elements (1 GiB), e.g. 2076 tokens of a 129280-way vocabulary.
CHUNK_ELEMENTS = 1 << 28


def _chunk_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [r, vocab], targets [r] -> log-sum-exp [r], loss [r] (fp32)."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    return lse, lse - z.gather(-1, targets[:, None]).squeeze(-1)


def _chunk_grad(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d loss / d logits = (softmax - onehot(target)) * grad, [r, vocab] in the logits' dtype."""
    z = logits.float()
    target = torch.arange(z.shape[-1], device=z.device) == targets[:, None]
    return (((z - lse[:, None]).exp() - target.float()) * grad[:, None]).to(logits.dtype)


_fused: dict = {}


def _kernel(fn):
    """`fn` itself on CPU; on GPU compiled once into fused kernels (one pass over the chunk's
    logits instead of one per element-wise step)."""
    def run(*args):
        if not args[0].is_cuda:
            return fn(*args)
        if fn not in _fused:
            _fused[fn] = torch.compile(fn, dynamic=False)
        return _fused[fn](*args)
    return run


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        losses = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)            # [n]
        lse = torch.empty_like(losses)
        for start in range(0, x.shape[0], rows):
            chunk = slice(start, start + rows)
            lse[chunk], losses[chunk] = _kernel(_chunk_losses)(x[chunk] @ weight.t(), targets[chunk])
        ctx.save_for_backward(x, weight, targets, lse)
        ctx.rows = rows
        return losses

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, targets, lse = ctx.saved_tensors
        dx = torch.empty_like(x)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, x.shape[0], ctx.rows):
            chunk = slice(start, start + ctx.rows)
            g = _kernel(_chunk_grad)(x[chunk] @ weight.t(), lse[chunk], targets[chunk], grad[chunk])   # [r, vocab]
            dx[chunk] = g @ weight
            dw += (g.t() @ x[chunk]).float()
        return dx, dw.to(weight.dtype), None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         rows: int | None = None) -> torch.Tensor:
    """Per-token cross-entropy of the logits x @ weight^T against targets, chunked over tokens.
    x [n, d], weight [vocab, d], targets [n] -> [n] fp32. Under autocast the products run in its
    dtype, as the plain head's would; `rows` defaults to CHUNK_ELEMENTS / vocab."""
    rows = rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return _LinearCrossEntropy.apply(x.to(dtype), weight.to(dtype), targets, rows)
    return _LinearCrossEntropy.apply(x, weight.to(x.dtype), targets, rows)
