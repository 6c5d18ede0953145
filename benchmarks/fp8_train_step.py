"""Training steps of megads' own Trainer on configs/bench-h100.yaml, one GPU: bf16 vs FP8 step
time, tokens/s, MFU and peak memory, and the bf16 vs FP8 loss over a few hundred steps.

    PYTHONUNBUFFERED=1 python benchmarks/fp8_train_step.py --steps 10 --loss-steps 300 --json out.json

A step is `Trainer.train_step` on one micro-batch of 1 x 4096 tokens, single process (no
DeepSpeed): forward under bf16 autocast, backward, global-norm clipping, fused AdamW on fp32
master weights, router-bias update. Variants (each a config override of the bench config):

  bf16                       fp8.enabled=false (grouped_mm experts, cuDNN attention)
  bf16, mem-efficient attn   the same with SDPA's default backend for MLA head dims
  fp8                        fp8.enabled=true, backend torch
  fp8, cached activations    + fp8.cache_fp8_activations=true

and, for the loss comparison only (--loss-variants), "bf16, looped experts" (the per-expert
loop instead of torch._grouped_mm: the same products, a measure of run-to-run spread) and
"fp8, emulated backend" (the FP8 numerics without the Hopper kernels).

The data is a learnable deterministic token stream written as an indexed dataset: random
concatenations of 2000 fixed "phrases" of 8-24 tokens (ids 1..31999; 0 is eos), so after a
phrase's first token the rest is predictable (about 0.5 nats per token at best). The loss
comparison trains the chosen variants from the same seed on the same stream.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import types

import numpy as np
import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megads.config import load_config                                      # noqa: E402
from megads.data import PreparedData                                       # noqa: E402
from megads.data.indexed import IndexedDataset, IndexedDatasetWriter       # noqa: E402
from megads.model import mla                                               # noqa: E402
from megads.model.moe import GroupedExperts, grouped_linear_loop          # noqa: E402
from megads.train.trainer import Trainer                                   # noqa: E402

EOS = 0
VARIANTS = {"bf16": ["fp8.enabled=false"],
            "bf16, mem-efficient attn": ["fp8.enabled=false"],
            "fp8": ["fp8.enabled=true"],
            "fp8, cached activations": ["fp8.enabled=true", "fp8.cache_fp8_activations=true"],
            "fp8, emulated backend": ["fp8.enabled=true", "fp8.backend=emulated"],
            "bf16, looped experts": ["fp8.enabled=false"]}
TIMED = ["bf16", "bf16, mem-efficient attn", "fp8", "fp8, cached activations"]
DEFAULT_SDPA = list(mla.SDPA_BACKENDS)


def phrase_data(directory: str, docs: int, vocab_size: int, seed: int = 0) -> PreparedData:
    """Documents of 64 phrases each, written as train / valid indexed datasets."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(1, 32000, size=n) for n in rng.integers(8, 25, size=2000)]
    sets = []
    for split, count in (("train", docs), ("valid", 8)):
        writer = IndexedDatasetWriter(os.path.join(directory, split), vocab_size)
        for _ in range(count):
            writer.add_document(np.concatenate([phrases[i] for i in rng.integers(0, len(phrases), size=64)]))
        writer.finalize()
        sets.append(IndexedDataset(os.path.join(directory, split)))
    return PreparedData(types.SimpleNamespace(eos_id=EOS, vocab_size=vocab_size), *sets)


def build(config: str, overrides: list[str], data: PreparedData, attention: str) -> Trainer:
    cfg = load_config(config, overrides + ["train.eval_interval=0"]).validate(world_size=1)
    mla.SDPA_BACKENDS = ([SDPBackend.EFFICIENT_ATTENTION] if attention == "efficient" else DEFAULT_SDPA)
    return Trainer(cfg, data)


def build_variant(args, name: str, data: PreparedData, extra: list[str] = ()) -> Trainer:
    trainer = build(args.config, VARIANTS[name] + list(extra), data, "efficient" if "mem-efficient" in name else "default")
    if name == "bf16, looped experts":
        for module in trainer.model.modules():
            if isinstance(module, GroupedExperts):
                module.grouped_gemm = grouped_linear_loop
    return trainer


def release(trainer: Trainer) -> None:
    del trainer.model, trainer.optimizer, trainer.stepper
    gc.collect()
    torch.cuda.empty_cache()


def time_variants(args, data: PreparedData, report: dict) -> None:
    rows = report.setdefault("step", [])
    for name in TIMED:
        trainer = build_variant(args, name, data)
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
            print(f"{name:>26}: failed: {str(error).splitlines()[0][:300]}", flush=True)
            continue
        finally:
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
            tokens = trainer.cfg.train.global_batch * trainer.cfg.train.seq_len
            flops, peak_flops = trainer.flops_per_token, trainer.peak_flops
            release(trainer)
        seconds = float(np.median(times))
        row = {"variant": name, "step_ms": seconds * 1e3, "tokens_per_s": tokens / seconds,
               "model_tflops": tokens * flops / seconds / 1e12, "mfu": tokens * flops / seconds / peak_flops,
               "peak_gib": peak, "peak_tflops_assumed": peak_flops / 1e12, "skipped_steps": skipped}
        rows.append(row)
        print(f"{name:>26}: {row['step_ms']:6.1f} ms/step  {row['tokens_per_s'] / 1e3:5.1f}k tok/s  "
              f"{row['model_tflops']:4.0f} TFLOP/s  MFU {100 * row['mfu']:4.1f}%  peak {peak:5.1f} GiB  "
              f"({skipped} skipped)", flush=True)
    base = {r["variant"]: r["step_ms"] for r in rows}
    for fast, slow in (("fp8", "bf16"), ("fp8, cached activations", "bf16"), ("bf16", "bf16, mem-efficient attn")):
        if fast in base and slow in base:
            print(f"{fast} over {slow}: {base[slow] / base[fast]:.3f}x faster")


def profile(args, data: PreparedData, report: dict) -> None:
    """The CUDA kernels that take the most time in bf16 and fp8 steps (after warm-up)."""
    for name in ("bf16", "fp8"):
        trainer = build(args.config, VARIANTS[name], data, "default")
        for _ in range(args.warmup):
            trainer.train_step(trainer.train_batches.next_step())
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            trainer.train_step(trainer.train_batches.next_step())
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile_rows, max_name_column_width=70)
        report.setdefault("profile", {})[name] = table
        print(f"--- {name} step, top CUDA kernels\n{table}", flush=True)
        release(trainer)


def loss_curves(args, data: PreparedData, report: dict) -> None:
    curves = {}
    for name in args.loss_variants:
        trainer = build_variant(args, name, data, [f"train.steps={args.loss_steps}"])
        losses, skipped = [], 0
        for _ in range(args.loss_steps):
            result = trainer.train_step(trainer.train_batches.next_step())
            trainer.step += 1
            losses.append(result.lm_loss)
            skipped += result.skipped
        curves[name] = torch.tensor(losses)
        report.setdefault("skipped_steps", {})[name] = skipped
        print(f"{name}: {skipped} of {args.loss_steps} steps skipped as non-finite", flush=True)
        release(trainer)
    bf16, fp8 = curves["bf16"], curves["fp8"]
    relative = ((fp8 - bf16) / bf16).abs()
    report["loss_curves"] = {name: curve.tolist() for name, curve in curves.items()}
    for name, curve in curves.items():
        print(f"{name:>24}: " + "  ".join(f"{curve[i]:.4f}" for i in range(0, args.loss_steps, 25))
              + f"  final {curve[-1]:.4f} (rel to bf16 {((curve[-1] - bf16[-1]) / bf16[-1]).item():+.3%})")
    tail = min(50, args.loss_steps)
    summary = {"steps": args.loss_steps, "bf16_first": bf16[0].item(), "bf16_final": bf16[-1].item(),
               "fp8_final": fp8[-1].item(), "final_rel": relative[-1].item(),
               "last50_mean_rel": ((fp8[-tail:].mean() - bf16[-tail:].mean()) / bf16[-tail:].mean()).abs().item(),
               "max_rel_after_100": relative[100:].max().item() if args.loss_steps > 100 else float("nan"),
               "bf16": bf16.tolist(), "fp8": fp8.tolist()}
    report["loss"] = summary
    for i in list(range(0, args.loss_steps, 25)) + [args.loss_steps - 1]:
        print(f"step {i + 1:4d}: bf16 {bf16[i]:.4f}  fp8 {fp8[i]:.4f}  rel {relative[i]:.3%}")
    print(f"final rel diff {summary['final_rel']:.3%}; last-{tail} mean rel diff {summary['last50_mean_rel']:.3%}; "
          f"max per-step rel diff after step 100 {summary['max_rel_after_100']:.3%}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench-h100.yaml")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--loss-steps", type=int, default=300, help="0 skips the loss comparison")
    parser.add_argument("--loss-variants", nargs="+", default=["bf16", "fp8"], choices=list(VARIANTS),
                        help="compared over --loss-steps (bf16 and fp8 required)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--profile-rows", type=int, default=0, help="profile one bf16 and one fp8 step: top N kernels")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": args.config}
    vocab = load_config(args.config).model.vocab_size
    with tempfile.TemporaryDirectory() as directory:
        data = phrase_data(directory, docs=max(args.loss_steps, args.warmup + args.steps) * 6 * len(TIMED), vocab_size=vocab)
        sections = ([] if args.skip_timing else [time_variants]) + ([profile] if args.profile_rows else []) \
            + ([loss_curves] if args.loss_steps else [])
        for section in sections:
            section(args, data, report)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
