"""megads' grouped expert GEMM (`grouped_linear`, the default `ExpertsStrategy.gemm`; torch._grouped_mm on Hopper) on
the v3-16b expert shape, one GPU: correctness against the per-expert loop and speed against a
plain bf16 matmul of the same FLOPs.

    PYTHONUNBUFFERED=1 python benchmarks/grouped_experts.py --json grouped_experts.json

Shape: 64 experts, hidden 2048, expert intermediate 1408, 6 experts per token, 4096 tokens
(24576 routed rows), top-6 routing of random scores. For each projection (gate/up 2048 -> 1408,
down 1408 -> 2048) it prints the relative error of the forward and both gradients against
`grouped_linear_loop` in bf16 (both against an fp32 loop as well), and the TFLOP/s of forward
and forward+backward vs one [24576, K] x [K, N] bf16 matmul (and its fwd+bwd).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megads.model.moe import grouped_linear, grouped_linear_loop          # noqa: E402

TOKENS, EXPERTS, TOP_K = 4096, 64, 6
SHAPES = [("gate/up", 2048, 1408), ("down", 1408, 2048)]
BF16 = torch.bfloat16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def routed_counts() -> torch.Tensor:
    scores = torch.rand(TOKENS, EXPERTS, device="cuda")
    return torch.bincount(scores.topk(TOP_K, dim=-1).indices.flatten(), minlength=EXPERTS)


def fwd_bwd(fn, x, w, counts, grad):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x, w, counts)
    y.backward(grad)
    return y.detach(), x.grad, w.grad


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    counts = routed_counts()
    rows = int(counts.sum())
    for name, k, n in SHAPES:
        x = torch.randn(rows, k, device="cuda", dtype=BF16)
        w = (torch.randn(EXPERTS, n, k, device="cuda") * k ** -0.5).to(BF16)
        grad = torch.randn(rows, n, device="cuda", dtype=BF16)
        ours = fwd_bwd(grouped_linear, x, w, counts, grad)
        loop = fwd_bwd(grouped_linear_loop, x, w, counts, grad)
        exact = fwd_bwd(grouped_linear_loop, x.float(), w.float(), counts, grad.float())
        errors = {f"{what}_vs_bf16_loop": rel(a, b) for what, a, b in zip(("y", "dx", "dw"), ours, loop)}
        errors.update({f"{what}_vs_fp32_loop": rel(a, b) for what, a, b in zip(("y", "dx", "dw"), ours, exact)})
        errors.update({f"{what}_bf16_loop_vs_fp32": rel(a, b) for what, a, b in zip(("y", "dx", "dw"), loop, exact)})

        flop = 2 * rows * k * n
        dense_w = w[0].contiguous()
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
        xd, wd = x.detach().requires_grad_(), dense_w.detach().requires_grad_()

        def grouped_train():
            xg.grad = wg.grad = None
            grouped_linear(xg, wg, counts).backward(grad)

        def dense_train():
            xd.grad = wd.grad = None
            torch.nn.functional.linear(xd, wd).backward(grad)
        times = {"grouped fwd": do_bench(lambda: grouped_linear(x, w, counts), return_mode="median"),
                 "dense fwd": do_bench(lambda: x @ dense_w.t(), return_mode="median"),
                 "loop fwd": do_bench(lambda: grouped_linear_loop(x, w, counts), return_mode="median"),
                 "grouped fwd+bwd": do_bench(grouped_train, return_mode="median"),
                 "dense fwd+bwd": do_bench(dense_train, return_mode="median")}
        tflops = {what: (3 if "bwd" in what else 1) * flop / ms / 1e9 for what, ms in times.items()}
        row = {"shape": name, "K": k, "N": n, "rows": rows, **errors, **{f"{w_} tflops": v for w_, v in tflops.items()},
               "fwd_ratio": tflops["grouped fwd"] / tflops["dense fwd"],
               "fwd_bwd_ratio": tflops["grouped fwd+bwd"] / tflops["dense fwd+bwd"]}
        report["rows"].append(row)
        print(f"{name:>8} (K={k}, N={n}, {rows} rows): " + ", ".join(f"{kk} {v:.1e}" for kk, v in errors.items()))
        print(f"{'':>8} TFLOP/s: " + ", ".join(f"{kk} {v:.0f}" for kk, v in tflops.items())
              + f" | grouped/dense fwd {row['fwd_ratio']:.2f}, fwd+bwd {row['fwd_bwd_ratio']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
