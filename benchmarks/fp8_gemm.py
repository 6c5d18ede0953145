"""FP8 GEMMs on the v3-16b linear shapes, one Hopper GPU: correctness and speed.

1. check: the Triton quantisation kernels are bit-identical to megads.fp8.quant, and the
   `torch` backend's Fprop / Dgrad / Wgrad (dense and grouped) equal the `emulated` backend's
   within 1e-2 relative.
2. speed: TFLOP/s of each GEMM kind, bf16 (pre-cast bf16 weights, the strict baseline) vs
   FP8 GEMM alone; then a layer's three GEMMs (Fprop + Dgrad + Wgrad) with everything FP8
   training adds (x and grad quantised along both dims, the weight into W and W^T blocks,
   x re-quantised along the tokens for Wgrad), timed as called from Python ("eager") and as a
   CUDA-graph replay (GPU time alone: the gap is launch overhead). Experts: the grouped
   Triton kernels vs torch._grouped_mm and the per-expert loop. Last, Triton vs eager
   PyTorch for the 1x128 quantisation.

    PYTHONUNBUFFERED=1 python benchmarks/fp8_gemm.py --json fp8_gemm.json

M = 4096 tokens (one bench-shape sequence); experts: 64, 6 per token, so 24576 routed rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megads.fp8 import quant                                              # noqa: E402
from megads.fp8 import triton_kernels as tk                               # noqa: E402
from megads.fp8.emulated import EmulatedBackend                           # noqa: E402
from megads.fp8.grouped import FP8GroupedGemm                             # noqa: E402
from megads.fp8.linear import FP8Gemm, FP8Recipe                          # noqa: E402
from megads.fp8.torch_backend import TorchBackend, fp32_output_supported  # noqa: E402
from megads.model.moe import grouped_linear_loop                          # noqa: E402

M = 4096
DENSE = [("q_proj", 2048, 3072), ("kv_a_proj_with_mqa", 2048, 576), ("kv_b_proj", 512, 4096),
         ("o_proj", 2048, 2048), ("dense gate/up", 2048, 10944), ("dense down", 10944, 2048),
         ("shared gate/up", 2048, 2816), ("shared down", 2816, 2048)]          # (name, K = in, N = out)
EXPERTS, TOP_K = 64, 6
GROUPED = [("experts gate/up", 2048, 1408), ("experts down", 1408, 2048)]
BF16 = torch.bfloat16


def timed(fn, graph: bool = False) -> float:
    """Median milliseconds, of eager calls or of CUDA-graph replays."""
    fn()
    if graph:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def same(a: quant.QTensor, b: quant.QTensor) -> bool:
    """Bit-identical over b's (emulated, 128-padded) extent; a's extra padding must be zeros."""
    r, c = b.data.shape[-2:]
    extra_zero = (a.data[..., r:, :].float() == 0).all() and (a.data[..., :, c:].float() == 0).all()
    return (torch.equal(a.data[..., :r, :c].view(torch.uint8), b.data.view(torch.uint8))
            and torch.equal(a.scale[..., :b.scale.shape[-2], :b.scale.shape[-1]], b.scale) and bool(extra_zero))


def activations(rows: int, cols: int) -> torch.Tensor:
    x = torch.randn(rows, cols, device="cuda") * torch.exp(torch.randn(rows, 1, device="cuda"))
    x.view(-1)[torch.randint(0, x.numel(), (16,), device="cuda")] = 300.0
    return x.to(BF16)


def routed_counts() -> torch.Tensor:
    scores = torch.rand(M, EXPERTS, device="cuda")
    return torch.bincount(scores.topk(TOP_K, dim=-1).indices.flatten(), minlength=EXPERTS)


def dense_gemms(backend, x, w, gy):
    """Fprop, Dgrad, Wgrad outputs of one backend, cropped, as in training."""
    m, k, n = x.shape[0], x.shape[1], w.shape[0]
    x_rows, x_cols = backend.quantize_act(x, True, True)
    w_q, w_t = backend.quantize_weight(w, True, True)
    g_rows, g_cols = backend.quantize_act(gy, True, True)
    return {"fprop": quant.crop(backend.mm(x_rows, w_q, BF16), m, n),
            "dgrad": quant.crop(backend.mm(g_rows, w_t, BF16), m, k),
            "wgrad": quant.crop(backend.mm(g_cols, x_cols, torch.float32), n, k)}


def grouped_gemms(backend, x, w, gy, counts):
    rows, (_, n, k) = x.shape[0], w.shape
    layout = backend.group_layout(counts, rows)
    x_rows, x_cols = backend.quantize_act(x, True, True, layout)
    w_q, w_t = backend.quantize_weight(w, True, True)
    g_rows, g_cols = backend.quantize_act(gy, True, True, layout)
    return {"fprop": backend.grouped_mm(x_rows, w_q, layout, rows, n, BF16),
            "dgrad": backend.grouped_mm(g_rows, w_t, layout, rows, k, BF16),
            "wgrad": backend.grouped_wgrad(g_cols, x_cols, layout, n, k)}


def check(report: dict) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    emu, tor = EmulatedBackend(), TorchBackend()
    rows = report.setdefault("check", [])
    fp32_out = fp32_output_supported(torch.device("cuda"))
    rows.append({"what": "blockwise _scaled_mm writes fp32 (else Wgrad is written in bf16)", "value": fp32_out})
    print(f"blockwise _scaled_mm with fp32 output: {'supported' if fp32_out else 'refused, Wgrad written in bf16'}")
    for p2 in (False, True):
        emu.power_of_two = tor.power_of_two = p2
        x, w = activations(1000, 1800), torch.randn(3, 1408, 2000, device="cuda")
        ok = [same(a, b) for a, b in zip(tor.quantize_act(x, True, True), emu.quantize_act(x, True, True))]
        ok += [same(a, b) for a, b in zip(tor.quantize_weight(w, True, True), emu.quantize_weight(w, True, True))]
        ok += [same(a, b) for a, b in zip(tor.quantize_weight(w[0], True, True), emu.quantize_weight(w[0], True, True))]
        rows.append({"what": f"Triton quantisation == PyTorch reference (power_of_two={p2})", "value": all(ok)})
        print(f"quantisation bit-identical (power_of_two={p2}): x rows/cols, W/W^T blocks (3-D, 2-D) = {ok}")
    emu.power_of_two = tor.power_of_two = False
    for name, k, n in [*DENSE, ("odd sizes", 200, 136)]:
        x, gy, w = activations(M, k), activations(M, n), torch.randn(n, k, device="cuda") * k ** -0.5
        ours, ref = dense_gemms(tor, x, w, gy), dense_gemms(emu, x, w, gy)
        errors = {kind: rel(ours[kind], ref[kind]) for kind in ours}
        rows.append({"what": f"torch vs emulated, {name} (K={k}, N={n})", **errors})
        print(f"torch vs emulated {name:>20}: " + ", ".join(f"{kk} {v:.2e}" for kk, v in errors.items()))
    uneven = torch.tensor([0, 3, 130, 400, 1, 256, 77, 0], device="cuda")
    for name, k, n, counts in [(*GROUPED[0], routed_counts()), (*GROUPED[1], routed_counts()),
                               ("experts, uneven", 200, 136, uneven)]:
        rows_n, e = int(counts.sum()), counts.numel()
        x, gy, w = activations(rows_n, k), activations(rows_n, n), torch.randn(e, n, k, device="cuda") * k ** -0.5
        ours, ref = grouped_gemms(tor, x, w, gy, counts), grouped_gemms(emu, x, w, gy, counts)
        errors = {kind: rel(ours[kind], ref[kind]) for kind in ours}
        rows.append({"what": f"torch vs emulated, {name} (K={k}, N={n})", **errors})
        print(f"torch vs emulated {name:>20}: " + ", ".join(f"{kk} {v:.2e}" for kk, v in errors.items()))
    # the autograd functions end to end, under autocast as in training
    grads = {}
    x0, w0 = activations(M, 2048).float(), torch.randn(3072, 2048, device="cuda") * 0.02
    for backend in (emu, tor):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=BF16):
            y = FP8Gemm(FP8Recipe(backend))(x, w)
        y.backward(torch.ones_like(y))
        grads[backend.name] = (y, x.grad, w.grad)
    errors = {kk: rel(a, b) for kk, a, b in zip(("y", "dx", "dw"), grads["torch"], grads["emulated"])}
    rows.append({"what": "FP8Gemm autograd under autocast, torch vs emulated", **errors})
    print("FP8Gemm autograd torch vs emulated: " + ", ".join(f"{kk} {v:.2e}" for kk, v in errors.items()))
    exact = x0 @ w0.t()
    print(f"  (and FP8 vs the exact fp32 product: {rel(grads['torch'][0], exact):.2e})")


def dense_speed(report: dict) -> None:
    tor = TorchBackend()
    rows = report.setdefault("dense", [])
    for name, k, n in DENSE:
        x, gy, w = activations(M, k), activations(M, n), torch.randn(n, k, device="cuda") * k ** -0.5
        wb = w.to(BF16)
        (x_rows, x_cols), (w_q, w_t) = tor.quantize_act(x, True, True), tor.quantize_weight(w, True, True)
        g_rows, g_cols = tor.quantize_act(gy, True, True)
        flop = 2 * M * n * k
        bf16 = {"fprop": lambda: F.linear(x, wb), "dgrad": lambda: gy @ wb, "wgrad": lambda: gy.t() @ x}
        fp8 = {"fprop": lambda: tor.mm(x_rows, w_q, BF16), "dgrad": lambda: tor.mm(g_rows, w_t, BF16),
               "wgrad": lambda: tor.mm(g_cols, x_cols, torch.float32)}
        row = {"shape": name, "K": k, "N": n}
        for kind in bf16:
            row[f"{kind}_bf16_tflops"] = flop / timed(bf16[kind]) / 1e9
            row[f"{kind}_fp8_tflops"] = flop / timed(fp8[kind]) / 1e9

        def bf16_layer():
            F.linear(x, wb), gy @ wb, gy.t() @ x

        def fp8_layer():
            xr, _ = tor.quantize_act(x, True, False)
            wq, wt = tor.quantize_weight(w, True, True)
            tor.mm(xr, wq, BF16)
            gr, gc = tor.quantize_act(gy, True, True)
            tor.mm(gr, wt, BF16)
            tor.mm(gc, tor.quantize_act(x, False, True)[1], torch.float32)
        t_bf16, t_eager, t_graph = timed(bf16_layer, graph=True), timed(fp8_layer), timed(fp8_layer, graph=True)
        row.update({"layer_bf16_tflops": 3 * flop / t_bf16 / 1e9, "layer_fp8_eager_tflops": 3 * flop / t_eager / 1e9,
                    "layer_fp8_graph_tflops": 3 * flop / t_graph / 1e9})
        rows.append(row)
        print(f"{name:>20}: " + "  ".join(f"{kind} bf16 {row[f'{kind}_bf16_tflops']:4.0f} fp8 {row[f'{kind}_fp8_tflops']:5.0f} "
                                          f"({row[f'{kind}_fp8_tflops'] / row[f'{kind}_bf16_tflops']:.2f}x)" for kind in bf16)
              + f" | 3 GEMMs + quant: bf16 {row['layer_bf16_tflops']:4.0f}, fp8 eager {row['layer_fp8_eager_tflops']:4.0f} "
                f"({row['layer_fp8_eager_tflops'] / row['layer_bf16_tflops']:.2f}x), graph {row['layer_fp8_graph_tflops']:4.0f} "
                f"({row['layer_fp8_graph_tflops'] / row['layer_bf16_tflops']:.2f}x)")


def grouped_speed(report: dict) -> None:
    tor = TorchBackend()
    rows = report.setdefault("grouped", [])
    counts = routed_counts()
    n_rows = M * TOP_K
    offs = counts.cumsum(0).to(torch.int32)
    layout = tor.group_layout(counts, n_rows)
    for name, k, n in GROUPED:
        x, gy = activations(n_rows, k), activations(n_rows, n)
        w = torch.randn(EXPERTS, n, k, device="cuda") * k ** -0.5
        wb = w.to(BF16)
        flop = 2 * n_rows * n * k
        (x_rows, x_cols), (w_q, w_t) = tor.quantize_act(x, True, True, layout), tor.quantize_weight(w, True, True)
        g_rows, g_cols = tor.quantize_act(gy, True, True, layout)
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()

        def train(fn):
            def run():
                xx.grad = ww.grad = None
                fn(xx, ww).backward(gy)
            return run
        fp8_gemm = FP8GroupedGemm(FP8Recipe(tor))
        candidates = {
            "bf16 loop fprop": (1, lambda: grouped_linear_loop(x, wb, counts)),
            "bf16 _grouped_mm fprop": (1, lambda: torch._grouped_mm(x, wb.transpose(-2, -1), offs=offs)),
            "fp8 fprop GEMM": (1, lambda: tor.grouped_mm(x_rows, w_q, layout, n_rows, n, BF16)),
            "fp8 dgrad GEMM": (1, lambda: tor.grouped_mm(g_rows, w_t, layout, n_rows, k, BF16)),
            "fp8 wgrad GEMM": (1, lambda: tor.grouped_wgrad(g_cols, x_cols, layout, n, k)),
            "bf16 _grouped_mm fwd+bwd": (3, train(lambda a, b: torch._grouped_mm(
                a, b.to(BF16).transpose(-2, -1), offs=counts.cumsum(0).to(torch.int32)))),
            "fp8 fwd+bwd": (3, train(lambda a, b: fp8_gemm(a, b, counts))),
        }
        for label, (passes, fn) in candidates.items():
            for graph in ((False, True) if "fwd+bwd" in label else (False,)):
                try:
                    t = timed(fn, graph)
                except Exception as error:            # noqa: BLE001 - report and go on
                    print(f"{name:>16} {label} (graph={graph}): failed: {str(error).splitlines()[0][:200]}")
                    continue
                what = label + (" (graph)" if graph else "")
                rows.append({"shape": name, "K": k, "N": n, "what": what, "ms": t, "tflops": passes * flop / t / 1e9})
                print(f"{name:>16} {what:>32}: {t * 1e3:7.0f} us {passes * flop / t / 1e9:6.0f} TFLOP/s")


def quant_speed(report: dict) -> None:
    x = activations(M, 2048)
    variants = {"triton": lambda: quantize_rows(x), "eager": lambda: quant.quantize_tiles(x)}
    moved = x.numel() * (2 + 1) + x.numel() // 128 * 4                    # bytes read + written
    for label, fn in variants.items():
        t = timed(fn, graph=True)
        report.setdefault("quant", []).append({"what": label, "us": t * 1e3, "GBps": moved / t / 1e6})
        print(f"1x128 quantisation of [4096, 2048] bf16, {label:>13}: {t * 1e3:6.1f} us, {moved / t / 1e6:5.0f} GB/s")


def quantize_rows(x: torch.Tensor) -> quant.QTensor:
    return tk.quantize_act(x, False, rows=True, cols=False)[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip", nargs="*", default=[], choices=["check", "dense", "grouped", "quant"])
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for section in (check, dense_speed, grouped_speed, quant_speed):
        if section.__name__.split("_")[0] in args.skip:
            continue
        try:
            section(report)
        except Exception:                          # noqa: BLE001 - one broken section must not hide the rest
            traceback.print_exc()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
