"""Pretraining entry point: `python -m megads.pretrain CONFIG.yaml [section.key=value ...]`,
alone or under torchrun."""
from __future__ import annotations

import json
import logging
import os
import sys

import torch
import torch.distributed as dist

from megads.checkpoint import CheckpointError
from megads.config import ConfigError, load_config
from megads.data import check_data_fits, prepare_data
from megads.parallel.data import deepspeed_config
from megads.parallel.mesh import Mesh, build_mesh
from megads.train.launcher_watch import exit_with_launcher
from megads.train.preemption import PreemptionSignals
from megads.train.run_dir import claim_run_dir
from megads.train.trainer import NonFiniteError, Trainer

log = logging.getLogger("megads")


def summarize(metrics_path: str) -> str:
    """First and last training / validation losses from metrics.jsonl."""
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r["loss"] for r in records if "loss" in r]
    valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    lines = []
    if train:
        lines.append(f"train loss {train[0]:.4f} -> {train[-1]:.4f} over {len(train)} steps")
    if valid:
        (s0, v0), (s1, v1) = valid[0], valid[-1]
        lines.append(f"valid loss {v0:.4f} (step {s0}) -> {v1:.4f} (step {s1}), {v1 / v0:.1%} of the first")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if rank != 0:
        logging.getLogger("megads").setLevel(logging.WARNING)
    try:
        cfg = load_config(argv[0], argv[1:]).validate(world_size=world_size).check_machine()
        if cfg.parallel.deepspeed_config:
            p = cfg.parallel
            deepspeed_config(cfg, Mesh(world_size, tp=p.tp, pp=p.pp, dp=world_size // (p.tp * p.pp)))
        data = prepare_data(cfg.data, cfg.model.vocab_size)
        check_data_fits(data, cfg.data, cfg.train.seq_len, cfg.train.global_batch)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        return refuse(err, rank)
    try:
        with claim_run_dir(cfg, rank):
            init_distributed(world_size)
            with PreemptionSignals() as preemption:
                result = Trainer(cfg, data, build_mesh(cfg.parallel)).fit(preemption)
    except (ConfigError, CheckpointError) as err:
        return refuse(err, rank)
    except NonFiniteError as err:
        print(f"megads: error: {err}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result["preempted"]:
        return preemption.requeue(result["steps"], rank)
    if rank == 0:
        print(summarize(result["metrics"]))
        print(f"run directory: {result['run_dir']}")
    return 0


def refuse(err: Exception, rank: int) -> int:
    """Bad input (a setting, a file, a checkpoint): one line from rank 0, exit status 2. Every rank
    meets the same error (settings and checkpoint checks are agreed), so the others stay silent."""
    if rank == 0:
        print(f"megads: error: {err}", file=sys.stderr)
    return 2


def init_distributed(world_size: int) -> None:
    """Join the torchrun job: NCCL with one GPU per rank, gloo on CPU."""
    exit_with_launcher()
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


if __name__ == "__main__":
    sys.exit(main())
