"""Training steps of megads' own Trainer on configs/bench-h100.yaml, one GPU: bf16 vs FP8 step
time, tokens/s, MFU and peak memory, where the time goes, and bf16 vs FP8 loss curves.

    PYTHONUNBUFFERED=1 python benchmarks/fp8_train_step.py --steps 5 --profile-rows 25 --loss-steps 300 --json out.json

A step is `Trainer.train_step` on the bench config's global batch (8 micro-batches of 1 x 4096
tokens, accumulated), single process (no DeepSpeed): forward under bf16 autocast, backward,
global-norm clipping, fused AdamW on fp32 master weights, router-bias update. Timed variants
(config overrides of the bench config, --variants):

  bf16, autocast          fp8.enabled=false, train.precision=autocast (every weight cast at every
                          use, bf16 weight gradients cast and added into fp32 ones),
                          train.compile=none, train.head_loss=plain (grouped_mm experts, cuDNN attention)
  bf16, autocast, compiled   the same with train.compile=layers
  bf16                    train.precision=main_grads: bf16 weight copies made once per step, fp32
                          weight gradients written by the GEMMs (model/precision.py); compile none
  bf16, compiled          the same with train.compile=layers (each decoder layer torch.compiled)
  bf16, fused head        the same with train.head_loss=fused (head + cross-entropy in chunks)
  bf16, compiled + fused head   both
  bf16, compiled, selective recompute   train.recompute=selective (GEMM and attention outputs kept)
  bf16, compiled, full recompute        train.recompute=full (each layer's input kept)
  fp8                     fp8.enabled=true, backend torch, weights quantised once per step
  fp8, no weight cache    the same, re-quantising every weight in every micro-batch
  fp8, bf16 experts       FP8 for the dense and attention projections, routed experts in bf16

Data: megads' synthetic arithmetic corpus (data.source=synthetic, built into data.cache_dir
if it is not there). The loss comparison (--loss-steps) trains each of --loss-arms
(variant:seed[:noise]; the seed sets the initial weights and the document order; noise, if
given, multiplies every initial weight by 1 + noise * N(0, 1), a control for how far a run moves
from a perturbation alone) with deterministic
algorithms where PyTorch has them and, by default, SDPA's math attention (its backward has no
atomics), on a schedule meant to be stable (--loss-overrides): lr 3e-4, 50 warm-up steps. A
variant repeated with the same seed shows whether two runs are bitwise identical; the
operations PyTorch flags as nondeterministic in the first step are printed.

The profile (--profile-rows) gives CUDA kernel time by category and the GEMM time split into
what FP8 may take (every projection) and what the recipe keeps in bf16 (output head, router),
from which it prints the most an FP8 step could gain over this bf16 step.
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
import warnings       # noqa: E402

import numpy as np    # noqa: E402
import torch          # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megads.model.mla as mla                                             # noqa: E402
from megads.config import load_config                                      # noqa: E402
from megads.data import prepare_data                                       # noqa: E402
from megads.train.trainer import Trainer                                   # noqa: E402

PLAIN = ["train.compile=none", "train.head_loss=plain"]
VARIANTS = {"bf16, autocast": ["fp8.enabled=false", "train.precision=autocast", *PLAIN],
            "bf16, autocast, compiled": ["fp8.enabled=false", "train.precision=autocast", "train.compile=layers",
                                         "train.head_loss=plain"],
            "bf16": ["fp8.enabled=false", *PLAIN],
            "bf16, compiled": ["fp8.enabled=false", "train.compile=layers", "train.head_loss=plain"],
            "bf16, fused head": ["fp8.enabled=false", "train.compile=none", "train.head_loss=fused"],
            "bf16, compiled + fused head": ["fp8.enabled=false", "train.compile=layers", "train.head_loss=fused"],
            "bf16, compiled, selective recompute": ["fp8.enabled=false", "train.compile=layers", "train.head_loss=plain",
                                                    "train.recompute=selective"],
            "bf16, compiled, full recompute": ["fp8.enabled=false", "train.compile=layers", "train.head_loss=plain",
                                               "train.recompute=full"],
            "fp8": ["fp8.enabled=true", *PLAIN],
            "fp8, no weight cache": ["fp8.enabled=true", "fp8.cache_weights=false", *PLAIN],
            "fp8, bf16 experts": ["fp8.enabled=true", "fp8.exclude=['*.experts', '*.experts.*']", *PLAIN]}
LOSS_OVERRIDES = ["train.lr=3e-4", "train.min_lr=3e-5", "train.warmup_steps=50", "train.global_batch=2"]
LOSS_ARMS = ["bf16:1234", "bf16:1234", "fp8:1234", "bf16:4321", "fp8:4321"]
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "aten::_scaled_mm",
            "aten::_scaled_grouped_mm")
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
    first = rows[0]["variant"] if rows else None
    for name in base:
        if name != first:
            print(f"{name} vs {first}: {base[first] / base[name]:.3f}x faster")


def categorise(events) -> dict[str, float]:
    totals: dict[str, float] = {}
    for event in events:
        label = next((c for c, pattern in CATEGORIES if re.search(pattern, event.key)), "other")
        totals[label] = totals.get(label, 0.0) + event.self_device_time_total / 1e3   # 0 for GPU annotations
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def split_gemms(events, vocab_size: int, n_experts: int) -> dict[str, float]:
    """CUDA time (ms) of the GEMM operators by what the FP8 recipe does with them: the output head
    (a dimension equal to the vocabulary) and the router (one equal to the expert count) stay in
    bf16; every other GEMM is a projection FP8 may take. The Triton FP8 expert kernels are not
    aten operators and are counted under their own category."""
    split = {"output head (bf16 in the recipe)": 0.0, "router (bf16 in the recipe)": 0.0, "projections": 0.0}
    for event in events:
        if event.key not in GEMM_OPS:
            continue
        dims = {d for shape in event.input_shapes for d in shape}
        label = ("output head (bf16 in the recipe)" if vocab_size in dims
                 else "router (bf16 in the recipe)" if n_experts in dims and event.key == "aten::mm" else "projections")
        split[label] += event.device_time_total / 1e3
    return split


def profile(args, report: dict) -> None:
    """CUDA kernel time of one step per variant: top kernels, time per category and the GEMM split
    (ms); for bf16 also the bound on what FP8 GEMMs could gain."""
    for name in args.profile_variants:
        trainer, _ = build(args.config, VARIANTS[name], args.data_docs, args.cache_dir)
        for _ in range(args.warmup):
            trainer.train_step(trainer.train_batches.next_step())
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            tic = time.perf_counter()
            trainer.train_step(trainer.train_batches.next_step())
            torch.cuda.synchronize()
            wall = (time.perf_counter() - tic) * 1e3
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile_rows,
                                          max_name_column_width=60)
        categories = categorise(kernels)
        total = sum(categories.values())
        gemms = split_gemms(prof.key_averages(group_by_input_shape=True), trainer.cfg.model.vocab_size,
                            trainer.cfg.model.n_routed_experts)
        entry = {"table": table, "categories_ms": categories, "total_ms": total, "gemm_split_ms": gemms,
                 "profiled_wall_ms": wall}
        print(f"--- {name} step: CUDA time {total:.1f} ms by category (profiled wall {wall:.0f} ms)\n"
              + "\n".join(f"  {k:>50}: {v:7.1f} ms" for k, v in categories.items())
              + "\n  GEMM operators: " + ", ".join(f"{k} {v:.1f} ms" for k, v in gemms.items()), flush=True)
        if name == "bf16":
            entry["fp8_bound"] = fp8_bound(total, gemms["projections"],
                                           gemms["output head (bf16 in the recipe)"] + gemms["router (bf16 in the recipe)"])
        print(table, flush=True)
        report.setdefault("profile", {})[name] = entry
        release(trainer)


def fp8_bound(total: float, projections: float, kept: float, speedups=(1.4, 1.6, 2.0)) -> dict:
    """The most an FP8 step could gain over a bf16 step of `total` ms of kernels whose FP8-eligible
    GEMMs take `projections` ms: those GEMMs `s` times faster and quantisation free. Also the same
    with every non-GEMM kernel free in both steps (the limit of fusing everything else away)."""
    bound = {}
    for speedup in speedups:
        step = total / (total - projections * (1 - 1 / speedup))
        gemms_only = (projections + kept) / (projections / speedup + kept)
        bound[f"{speedup}x"] = {"step": step, "gemms_only": gemms_only}
        print(f"  FP8 bound with projection GEMMs {speedup}x faster and free quantisation: step "
              f"{step:.3f}x; with every non-GEMM kernel free in both: {gemms_only:.3f}x", flush=True)
    return bound


def first_step_warnings(trainer: Trainer) -> tuple[object, list[str]]:
    """One training step, returning its result and the distinct warnings raised in it (the
    operations PyTorch flags as nondeterministic under warn_only)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.train_step(trainer.train_batches.next_step())
    return result, sorted({str(w.message).splitlines()[0][:200] for w in caught})


@torch.no_grad()
def perturb(model: torch.nn.Module, noise: float) -> None:
    """Multiply every parameter by 1 + noise * N(0, 1) (its own generator: the run's seed is untouched)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    for param in model.parameters():
        param.mul_(1 + noise * torch.randn(param.shape, generator=generator).to(param.device))


def loss_curves(args, report: dict) -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if args.loss_attention == "math":
        mla.SDPA_BACKENDS = [mla.SDPBackend.MATH]
    runs: dict[str, np.ndarray] = {}
    baselines: dict[str, str | None] = {}    # label -> the bf16 run of the same seed it is compared with
    for arm in args.loss_arms:
        name, seed, *noise = arm.split(":")
        label = f"{name} seed {seed}" + (f" weights x (1 + {noise[0]} N(0,1))" if noise else "")
        label += " (repeat)" if label in runs else ""
        baseline = f"bf16 seed {seed}"
        baselines[label] = None if label == baseline else baseline
        trainer, shape = build(args.config, VARIANTS[name] + args.loss_overrides
                               + [f"train.steps={args.loss_steps}", f"train.seed={seed}"], args.data_docs, args.cache_dir)
        if noise:
            perturb(trainer.model, float(noise[0]))
        losses, skipped, tic = [], 0, time.perf_counter()
        for i in range(args.loss_steps):
            if i == 0:
                result, flagged = first_step_warnings(trainer)
                report.setdefault("loss_warnings", {})[label] = flagged
                print(f"  {label}: warnings in step 1: {flagged or 'none'}", flush=True)
            else:
                result = trainer.train_step(trainer.train_batches.next_step())
            trainer.step += 1
            losses.append(result.lm_loss)
            skipped += result.skipped
            if (i + 1) % 50 == 0:
                print(f"  {label} step {i + 1}: lm loss {result.lm_loss:.4f} ({time.perf_counter() - tic:.0f} s)",
                      flush=True)
        runs[label] = np.array(losses)
        report.setdefault("loss_curves_partial", {})[label] = losses
        report.setdefault("loss_skipped", {})[label] = skipped
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        print(f"{label}: {args.loss_steps} steps of {shape['global_batch']} x {trainer.cfg.train.seq_len} tokens in "
              f"{time.perf_counter() - tic:.0f} s, {skipped} skipped", flush=True)
        release(trainer)
    report["loss"] = summarise_losses(runs, baselines, args)


def summarise_losses(runs: dict[str, np.ndarray], baselines: dict[str, str | None], args) -> dict:
    """Mean loss of the last 50 steps per run; every run against its bf16 baseline (same seed),
    grouped into repeats, perturbed runs and the other variants; the spread of the bf16 seeds."""
    tail = min(50, args.loss_steps)
    mean = {label: float(curve[-tail:].mean()) for label, curve in runs.items()}
    summary = {"steps": args.loss_steps, "overrides": args.loss_overrides, "attention": args.loss_attention,
               "tail": tail, f"last{tail}_mean": mean, "repeats": {}, "perturbed": {}, "vs_bf16": {}}
    for label, base in baselines.items():
        if base not in runs:
            continue
        steps = np.abs(runs[label] - runs[base]) / runs[base]
        key = "repeats" if label.endswith("(repeat)") else "perturbed" if " weights x" in label else "vs_bf16"
        summary[key][label] = {
            "identical": bool(np.array_equal(runs[label], runs[base])),
            "tail_mean_rel": (mean[label] - mean[base]) / mean[base],
            "median_step_rel_after_100": float(np.median(steps[100:])) if args.loss_steps > 100 else None}
    seeds = [mean[label] for label, base in baselines.items() if base is None]
    if len(seeds) > 1:
        summary["bf16_seed_spread_tail_mean_rel"] = (max(seeds) - min(seeds)) / min(seeds)
    summary["curves"] = {label: curve.tolist() for label, curve in runs.items()}
    for i in list(range(0, args.loss_steps, 25)) + [args.loss_steps - 1]:
        print(f"step {i + 1:4d}: " + "  ".join(f"{label} {curve[i]:.4f}" for label, curve in runs.items()))
    print(f"last-{tail}-step mean loss: " + ", ".join(f"{k} {v:.4f}" for k, v in mean.items()))
    for key in ("repeats", "perturbed", "vs_bf16"):
        for label, row in summary[key].items():
            print(f"{label}: " + ", ".join(f"{k} {v:+.4%}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items()))
    if "bf16_seed_spread_tail_mean_rel" in summary:
        print(f"bf16 seed-to-seed spread of the last-{tail} mean: {summary['bf16_seed_spread_tail_mean_rel']:.3%}")
    return summary


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
    parser.add_argument("--loss-arms", nargs="+", default=LOSS_ARMS, help="variant:seed, in order")
    parser.add_argument("--loss-attention", choices=["math", "megads"], default="math",
                        help="math: SDPA's math attention (deterministic backward); megads: megads' own choice")
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
