"""Parity on GPUs over NCCL: every layout that fits the GPUs of one machine trains the same 3
steps as one GPU, in fp32, and must end with the same losses, gradient norms and checkpoint
(weights, Adam moments, router biases) within float32 rounding.

    python benchmarks/gpu_parity.py --out /tmp/parity --gpus 2 [--json parity.json] [--layouts tp2 ...]

The multi-process CPU tests (tests/test_parallel_core.py, tests/test_pipeline_parity.py) check
the same maths over gloo; this runs the real `python -m megads.pretrain` under torchrun with
NCCL, DeepSpeed's ZeRO on GPU buffers and CUDA's all-to-all. Every tensor of the final
checkpoint is compared through `CheckpointReader`, which returns global tensors whatever layout
wrote them. As in the CPU tests, lr 2e-4 with Adam eps 1e-6 keeps Adam from amplifying the
rounding of near-zero gradients into weight differences.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megads.checkpoint import CheckpointReader, latest_checkpoint      # noqa: E402
STEPS = 3
SMALL = ["model.hidden_size=64", "model.num_layers=4", "model.intermediate_size=128", "model.moe_intermediate_size=32",
         "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
         "model.v_head_dim=16", "model.mtp_depth=1", "train.seq_len=32", "train.global_batch=8", "train.micro_batch=2",
         "train.warmup_steps=1", "train.lr=2e-4", "train.min_lr=2e-5", "train.eps=1e-6", "train.eval_interval=0",
         "train.seq_aux_alpha=0.01", "train.bias_update_speed=0.01", "train.log_interval=1",
         f"train.steps={STEPS}", "train.dtype=fp32", "checkpoint.interval=0",
         "checkpoint.save_at_end=true", "data.synthetic_docs=2000", "data.synthetic_valid_docs=100"]
# name -> (GPUs, overrides); "single" is the reference.
LAYOUTS = {
    "single": (1, ["parallel.tp=1"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "dp2-zero1": (2, ["parallel.tp=1", "parallel.zero_stage=1"]),
    "dp2-zero2": (2, ["parallel.tp=1", "parallel.zero_stage=2"]),
    "ep2-zero1": (2, ["parallel.tp=1", "parallel.ep=2", "parallel.zero_stage=1"]),
    "ep2xtp2": (2, ["parallel.tp=2", "parallel.ep=2"]),
    "pp2-1f1b": (2, ["parallel.tp=1", "parallel.pp=2", "parallel.pipeline_schedule=1f1b"]),
    "pp2-dualpipe": (2, ["parallel.tp=1", "parallel.pp=2", "parallel.pipeline_schedule=dualpipe"]),
    "pp2-dualpipev": (2, ["parallel.tp=1", "parallel.pp=2", "parallel.pipeline_schedule=dualpipev"]),
}


def train(name: str, gpus: int, overrides: list[str], out: str, device: str) -> tuple[str, float]:
    run_dir = os.path.join(out, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}", "--master-port=29511",
           "-m", "megads.pretrain", "configs/tiny.yaml", *SMALL, *overrides, f"train.device={device}",
           f"train.run_dir={run_dir}",
           f"data.cache_dir={os.path.join(out, 'data')}"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NVIDIA_TF32_OVERRIDE": "0", "OMP_NUM_THREADS": "4"})
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return run_dir, time.perf_counter() - started


def read_run(run_dir: str) -> tuple[list[dict], CheckpointReader]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "loss" in r]
    return steps, CheckpointReader(latest_checkpoint(os.path.join(run_dir, "checkpoints")))


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b| (the tests' measure)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def compare(run_dir: str, reference_dir: str) -> dict:
    steps, ckpt = read_run(run_dir)
    ref_steps, ref = read_run(reference_dir)
    result = {"steps": len(steps), "skipped": sum(bool(s.get("skipped")) for s in steps)}
    for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm"):
        result[key] = relative_difference(torch.tensor([s[key] for s in steps]), torch.tensor([s[key] for s in ref_steps]))
    names = ref.names()
    missing = sorted(set(names) - set(ckpt.names()))
    if missing:
        raise RuntimeError(f"{run_dir}: the checkpoint lacks {missing[:5]}")
    worst = max(((relative_difference(ckpt.read(n), ref.read(n)), n) for n in names), key=lambda t: t[0])
    result.update(tensors=len(names), max_tensor_difference=worst[0], worst_tensor=worst[1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="a scratch directory for the runs")
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--tolerance", type=float, default=1e-5)
    ap.add_argument("--json", help="write the table here too")
    ap.add_argument("--device", default="cuda", help="cpu runs the same check over gloo (a check of this script)")
    ap.add_argument("--layouts", nargs="*", default=list(LAYOUTS)[1:], choices=list(LAYOUTS)[1:])
    args = ap.parse_args()
    results, failures = {}, []
    reference, seconds = train("single", 1, LAYOUTS["single"][1], args.out, args.device)
    print(f"single: {seconds:.0f} s", flush=True)
    for name in args.layouts:
        gpus, overrides = LAYOUTS[name]
        if gpus > args.gpus:
            continue
        try:
            run_dir, seconds = train(name, gpus, overrides, args.out, args.device)
            results[name] = {"seconds": round(seconds, 1), **compare(run_dir, reference)}
        except RuntimeError as err:
            results[name] = {"error": str(err)[-2000:]}
        r = results[name]
        ok = "error" not in r and r["skipped"] == 0 and r["steps"] == STEPS and all(
            r[k] <= args.tolerance for k in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm",
                                             "max_tensor_difference"))
        if not ok:
            failures.append(name)
        print(f"{name}: {'ok' if ok else 'FAILED'} {json.dumps(r)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
            json.dump({"device": device, "torch": torch.__version__, "results": results}, f, indent=1)
    print("all layouts equal the single-GPU run" if not failures else f"FAILED: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
