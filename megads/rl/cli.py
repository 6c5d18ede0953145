"""The command line shared by `python -m megads.sft` and `python -m megads.grpo`: config, data,
process group, trainer, summary; alone or under torchrun (launch/run.py)."""
from __future__ import annotations

import json
import logging
import os
import sys

import torch.distributed as dist

from megads.checkpoint import CheckpointError
from megads.config import ConfigError, load_config
from megads.data import prepare_data
from megads.parallel.mesh import build_mesh
from megads.pretrain import init_distributed, refuse
from megads.train.preemption import PreemptionSignals
from megads.train.run_dir import claim_run_dir


def summarize(metrics_path: str) -> str:
    """Held-out greedy accuracy at the first and last evaluation."""
    with open(metrics_path) as f:
        evals = [r for r in map(json.loads, filter(str.strip, f)) if "eval_accuracy" in r]
    if not evals:
        return "no evaluation recorded"
    first, last = evals[0], evals[-1]
    return (f"held-out greedy accuracy {first['eval_accuracy']:.3f} (step {first['step']}) -> "
            f"{last['eval_accuracy']:.3f} (step {last['step']})")


def main(argv: list[str] | None, trainer_cls, usage: str) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if rank != 0:
        logging.getLogger("megads").setLevel(logging.WARNING)
    try:
        cfg = load_config(argv[0], argv[1:]).validate(world_size=world_size).check_machine()
        settings = getattr(cfg, trainer_cls.section)
        cfg.validate_generation_layout(world_size, settings.eval_problems)
        if trainer_cls.section == "grpo":
            cfg.validate_generation_layout(world_size, cfg.grpo.prompts_per_step)
        data = prepare_data(cfg.data, cfg.model.vocab_size)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        return refuse(err, rank)
    try:
        with claim_run_dir(cfg, rank):
            init_distributed(world_size)
            with PreemptionSignals() as preemption:
                result = trainer_cls(cfg, data.tokenizer, build_mesh(cfg.parallel)).fit(preemption)
    except CheckpointError as err:
        return refuse(err, rank)
    except ConfigError as err:          # e.g. a reward plug-in's bad value, met by the rank that computed it
        print(f"megads: error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result["preempted"]:
        return preemption.requeue(result["steps"], rank)
    if rank == 0:
        print(summarize(result["metrics"]))
        print(f"run directory: {result['run_dir']}")
    return 0
