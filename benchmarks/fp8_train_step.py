"""Training steps of megads' own Trainer on configs/bench-h100.yaml, one GPU: bf16 vs FP8 step
time, tokens/s, MFU and peak memory, where the time goes, and bf16 vs FP8 loss curves.

    PYTHONUNBUFFERED=1 python benchmarks/fp8_train_step.py --steps 5 --profile-rows 25 --loss-steps 300 --json out.json

A step is `Trainer.train_step` on the bench config's global batch (8 micro-batches of 1 x 4096
tokens, accumulated), single process (no DeepSpeed): forward under bf16 autocast, backward,
global-norm clipping, fused AdamW on fp32 master weights, router-bias update. Timed variants
(config overrides of the bench config, --variants):

  bf16                    fp8.enabled=false (grouped_mm experts, cuDNN attention)
  fp8                     fp8.enabled=true, backend torch, weights quantised once per step
  fp8, no weight cache    the same, re-quantising every weight in every micro-batch
  fp8, bf16 experts       FP8 for the dense and attention projections, routed experts in bf16

Data: megads' synthetic arithmetic corpus (data.source=synthetic, built into data.cache_dir
if it is not there). The loss comparison (--loss-steps) trains bf16 twice (run-to-run noise)
and fp8 once from the same seed on the same data with deterministic algorithms where PyTorch
has them, on a schedule meant to be stable (--loss-overrides): lr 3e-4, 50 warm-up steps.
"""
from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS (read at handle creation)

import argparse       # noqa: E402
import gc             # noqa: E402
import json           # noqa: E402
import re             # noqa: E402
import sys            # noqa: E402
import time           # noqa: E402

import numpy as np    # noqa: E402
import torch          # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megads.config import load_config                                      # noqa: E402
from megads.data import prepare_data                                       # noqa: E402
from megads.train.trainer import Trainer                                   # noqa: E402

VARIANTS = {"bf16": ["fp8.enabled=false"],
            "fp8": ["fp8.enabled=true"],
            "fp8, no weight cache": ["fp8.enabled=true", "fp8.cache_weights=false"],
            "fp8, bf16 experts": ["fp8.enabled=true", "fp8.exclude=['*.experts', '*.experts.*']"]}
LOSS_OVERRIDES = ["train.lr=3e-4", "train.min_lr=3e-5", "train.warmup_steps=50", "train.global_batch=2"]
# kernel name -> category, first match wins (CUDA kernels of one profiled step)
CATEGORIES = [("FP8 quantisation (Triton)", r"_quant_act_kernel|_quant_weight_kernel"),
              ("FP8 grouped expert GEMMs (Triton)", r"_grouped_mm_kernel|_grouped_wgrad_kernel"),
              ("attention (cuDNN)", r"cudnn|fmha|flash|sdpa|attn"),
              ("optimizer (multi-tensor: AdamW, norm, scaling)", r"multi_tensor|fused_adam|FusedAdam|_amp_foreach"),
              ("GEMMs (cuBLAS / CUTLASS, incl. bf16 grouped_mm)", r"gemm|nvjet|xmma|cutlass|Kernel2|sm90"),
              ("copies and dtype casts", r"copy|_to_copy|convert|cat_|CatArray"),
              ("reductions", r"reduce|Reduce|norm"),
              ("gather / scatter / index / sort", r"index|scatter|gather|sort|Sort|radix|cub::|embedding"),
              ("other elementwise", r"elementwise|vectorized|Elementwise")]


def build(config: str, overrides: list[str], data_docs: int, cache_dir: str | None) -> tuple[Trainer, dict]:
    extra = [f"data.synthetic_docs={data_docs}", "train.eval_interval=0"]
    extra += [f"data.cache_dir={cache_dir}"] if cache_dir else []
    cfg = load_config(config, extra + overrides).validate(world_size=1)
    return Trainer(cfg, prepare_data(cfg.data, cfg.model.vocab_size)), {"global_batch": cfg.train.global_batch,
                                                                         "micro_batch": cfg.train.micro_batch}


def release(trainer: Trainer) -> None:
    del trainer.model, trainer.optimizer, trainer.stepper
    gc.collect()
    torch.cuda.empty_cache()


def time_variants(args, report: dict) -> None:
    rows = report.setdefault("step", [])
    for name in args.variants:
        trainer, shape = build(args.config, VARIANTS[name], args.data_docs, args.cache_dir)
        try:
            for _ in range(args.warmup):
                trainer.train_step(trainer.train_batches.next_step())
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times, skipped = [], 0
            for _ in range(args.steps):
                tic = time.perf_counter()
                skipped += trainer.train_step(trainer.train_batches.next_step()).skipped
                torch.cuda.synchronize()
                times.append(time.perf_counter() - tic)
        except Exception as error:                 # noqa: BLE001 - report the variant and go on
            print(f"{name:>22}: failed: {str(error).splitlines()[0][:300]}", flush=True)
            release(trainer)
            continue
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
        tokens = trainer.cfg.train.global_batch * trainer.cfg.train.seq_len
        flops, peak_flops = trainer.flops_per_token, trainer.peak_flops
        release(trainer)
        seconds = float(np.median(times))
        row = {"variant": name, **shape, "step_ms": seconds * 1e3, "all_ms": [t * 1e3 for t in times],
               "tokens_per_s": tokens / seconds, "model_tflops": tokens * flops / seconds / 1e12,
               "mfu": tokens * flops / seconds / peak_flops, "peak_gib": peak, "skipped_steps": skipped}
        rows.append(row)
        print(f"{name:>22}: {row['step_ms']:7.1f} ms/step ({shape['global_batch']} x "
              f"{trainer.cfg.train.seq_len} tokens)  {row['tokens_per_s'] / 1e3:5.1f}k tok/s  "
              f"{row['model_tflops']:4.0f} TFLOP/s  MFU {100 * row['mfu']:4.1f}%  "
              f"peak {peak:5.1f} GiB  ({skipped} skipped)", flush=True)
    base = {r["variant"]: r["step_ms"] for r in rows}
    for name in base:
        if name != "bf16" and "bf16" in base:
            print(f"{name} vs bf16: {base['bf16'] / base[name]:.3f}x faster")


def categorise(events) -> dict[str, float]:
    totals: dict[str, float] = {}
    for event in events:
        label = next((c for c, pattern in CATEGORIES if re.search(pattern, event.key)), "other")
        totals[label] = totals.get(label, 0.0) + event.device_time_total / 1e3
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def profile(args, report: dict) -> None:
    """CUDA kernel time of one step, bf16 and fp8: top kernels and time per category (ms)."""
    for name in args.profile_variants:
        trainer, _ = build(args.config, VARIANTS[name], args.data_docs, args.cache_dir)
        for _ in range(args.warmup):
            trainer.train_step(trainer.train_batches.next_step())
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            trainer.train_step(trainer.train_batches.next_step())
            torch.cuda.synchronize()
        events = prof.key_averages()
        table = events.table(sort_by="cuda_time_total", row_limit=args.profile_rows, max_name_column_width=60)
        categories = categorise(events)
        total = sum(categories.values())
        report.setdefault("profile", {})[name] = {"table": table, "categories_ms": categories, "total_ms": total}
        print(f"--- {name} step: CUDA time {total:.1f} ms by category\n"
              + "\n".join(f"  {k:>50}: {v:7.1f} ms" for k, v in categories.items()) + f"\n{table}", flush=True)
        release(trainer)


def loss_curves(args, report: dict) -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    runs = {}
    for label, name in (("bf16 (run 1)", "bf16"), ("bf16 (run 2)", "bf16"), ("fp8", "fp8")):
        trainer, shape = build(args.config, VARIANTS[name] + args.loss_overrides + [f"train.steps={args.loss_steps}"],
                               args.data_docs, args.cache_dir)
        losses, skipped, tic = [], 0, time.perf_counter()
        for i in range(args.loss_steps):
            result = trainer.train_step(trainer.train_batches.next_step())
            trainer.step += 1
            losses.append(result.lm_loss)
            skipped += result.skipped
            if (i + 1) % 50 == 0:
                print(f"  {label} step {i + 1}: lm loss {result.lm_loss:.4f} ({time.perf_counter() - tic:.0f} s)",
                      flush=True)
        runs[label] = np.array(losses)
        report.setdefault("loss_curves_partial", {})[label] = losses
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        print(f"{label}: {args.loss_steps} steps of {shape['global_batch']} x {trainer.cfg.train.seq_len} tokens in "
              f"{time.perf_counter() - tic:.0f} s, {skipped} skipped", flush=True)
        report.setdefault("loss_skipped", {})[label] = skipped
        release(trainer)
    tail = min(50, args.loss_steps)
    mean = {label: float(curve[-tail:].mean()) for label, curve in runs.items()}
    a, b, f = runs["bf16 (run 1)"], runs["bf16 (run 2)"], runs["fp8"]
    summary = {"steps": args.loss_steps, "overrides": args.loss_overrides, "tail": tail, f"last{tail}_mean": mean,
               "bf16_runs_identical": bool(np.array_equal(a, b)),
               "bf16_run_to_run_max_step_rel": float(np.abs(a - b).max() / a[-tail:].mean()),
               "bf16_run_to_run_tail_mean_rel": abs(mean["bf16 (run 2)"] - mean["bf16 (run 1)"]) / mean["bf16 (run 1)"],
               "fp8_vs_bf16_tail_mean_rel": (mean["fp8"] - mean["bf16 (run 1)"]) / mean["bf16 (run 1)"],
               "fp8_vs_bf16_tail_mean_rel_to_run2": (mean["fp8"] - mean["bf16 (run 2)"]) / mean["bf16 (run 2)"],
               "fp8_vs_bf16_max_step_rel_after_100":
                   float((np.abs(f - a) / a)[100:].max()) if args.loss_steps > 100 else None,
               "curves": {label: curve.tolist() for label, curve in runs.items()}}
    report["loss"] = summary
    for i in list(range(0, args.loss_steps, 25)) + [args.loss_steps - 1]:
        print(f"step {i + 1:4d}: " + "  ".join(f"{label} {curve[i]:.4f}" for label, curve in runs.items()))
    print(f"last-{tail}-step mean loss: " + ", ".join(f"{k} {v:.4f}" for k, v in mean.items()))
    print(f"bf16 run 1 vs run 2: identical={summary['bf16_runs_identical']}, last-{tail} mean rel diff "
          f"{summary['bf16_run_to_run_tail_mean_rel']:.3%}; fp8 vs bf16: last-{tail} mean rel diff "
          f"{summary['fp8_vs_bf16_tail_mean_rel']:+.3%} (vs run 2: {summary['fp8_vs_bf16_tail_mean_rel_to_run2']:+.3%})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench-h100.yaml")
    parser.add_argument("--cache-dir", default=None, help="data.cache_dir for the synthetic corpus")
    parser.add_argument("--data-docs", type=int, default=40000, help="data.synthetic_docs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--profile-rows", type=int, default=0,
                        help="profile one step per --profile-variants: top N kernels")
    parser.add_argument("--profile-variants", nargs="+", default=["bf16", "fp8"], choices=list(VARIANTS))
    parser.add_argument("--loss-steps", type=int, default=0, help="0 skips the loss comparison")
    parser.add_argument("--loss-overrides", nargs="*", default=LOSS_OVERRIDES)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": args.config,
                    "argv": sys.argv[1:]}
    sections = ([] if args.skip_timing else [time_variants]) + ([profile] if args.profile_rows else []) \
        + ([loss_curves] if args.loss_steps else [])
    for section in sections:
        section(args, report)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
