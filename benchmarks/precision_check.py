"""GPU check of `train.precision=main_grads` (megads/model/precision.py): the weight-gradient GEMMs
with fp32 outputs, accumulated over micro-batches, against a float64 reference on the same bf16
operands, next to what autocast's bf16 weight gradients give; and compiled layers running the
main-grad GEMMs in one graph.

    python benchmarks/precision_check.py

Prints, per GEMM, the largest error relative to the reference's largest element; the CPU tests
(tests/test_precision.py) check the same logic on CPU kernels.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megads.model.layers import MLP, LinearFunction, LinearStrategy   # noqa: E402
from megads.model.moe import GroupedLinearFunction                    # noqa: E402
from megads.model.precision import MainGradGemm, WeightCopies          # noqa: E402

MICRO_BATCHES = 4


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def dense(device: torch.device, tokens: int = 4096, k: int = 2048, n: int = 10944) -> dict:
    """One dense projection of the bench shape, MICRO_BATCHES micro-batches accumulated."""
    gen = torch.Generator(device).manual_seed(0)
    param = torch.nn.Parameter(torch.randn(n, k, device=device, generator=gen) * 0.02)
    copy = param.detach().to(torch.bfloat16)
    xs = [torch.randn(tokens, k, device=device, generator=gen).bfloat16() for _ in range(MICRO_BATCHES)]
    dys = [torch.randn(tokens, n, device=device, generator=gen).bfloat16() * 1e-3 for _ in range(MICRO_BATCHES)]
    ref = sum(dy.double().t() @ x.double() for x, dy in zip(xs, dys))
    for x, dy in zip(xs, dys):
        LinearFunction.apply(x, param, copy, param.grad).backward(dy)
    autocast = torch.nn.Parameter(param.detach().clone())
    for x, dy in zip(xs, dys):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch.nn.functional.linear(x, autocast).backward(dy)
    return {"main grads (addmm into fp32)": rel_error(param.grad, ref), "autocast (bf16 dW)": rel_error(autocast.grad, ref)}


def grouped(device: torch.device, experts: int = 64, k: int = 2048, n: int = 1408, tokens: int = 4096 * 6) -> dict:
    """The routed experts' up projection of the bench shape: the grouped GEMM's bf16 output added into
    the fp32 gradient in place."""
    gen = torch.Generator(device).manual_seed(1)
    param = torch.nn.Parameter(torch.randn(experts, n, k, device=device, generator=gen) * 0.02)
    copy = param.detach().to(torch.bfloat16)
    counts = torch.full((experts,), tokens // experts, device=device)
    ref = torch.zeros(experts, n, k, dtype=torch.float64, device=device)
    for _ in range(MICRO_BATCHES):
        x = torch.randn(tokens, k, device=device, generator=gen).bfloat16()
        dy = torch.randn(tokens, n, device=device, generator=gen).bfloat16() * 1e-3
        GroupedLinearFunction.apply(x, param, copy, counts, True, param.grad).backward(dy)
        ref += torch.einsum("etn,etk->enk", dy.double().view(experts, -1, n), x.double().view(experts, -1, k))
    return {"grouped main grads (bf16 grouped_mm, fp32 sum)": rel_error(param.grad, ref)}


def compiled(device: torch.device) -> dict:
    """An MLP whose GEMMs are main-grad GEMMs, compiled with fullgraph=True, against eager."""
    torch.manual_seed(2)
    eager, other = MLP(2048, 4096).to(device), MLP(2048, 4096).to(device)
    other.load_state_dict(eager.state_dict())
    for mlp in (eager, other):
        copies = WeightCopies(torch.bfloat16)
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            copies.add(linear.weight)
            linear.strategy = LinearStrategy(gemm=MainGradGemm(copies, accumulate=True))
    graph = torch.compile(other, fullgraph=True)
    for _ in range(MICRO_BATCHES):
        x = torch.randn(2, 1024, 2048, device=device).bfloat16()
        eager(x).float().square().mean().backward()
        graph(x).float().square().mean().backward()
    return {f"compiled vs eager, {name}": rel_error(b.grad, a.grad.double())
            for (name, a), b in zip(eager.named_parameters(), other.parameters())}


def main() -> None:
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; errors: max |got - ref| / max |ref|")
    for check in (dense, grouped, compiled):
        for name, error in check(device).items():
            print(f"  {name:>45}: {error:.2e}", flush=True)


if __name__ == "__main__":
    main()
