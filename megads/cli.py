"""The one command line of every training stage: `python -m megads.pretrain | sft | grpo CONFIG
[section.key=value ...]`, alone or under torchrun (launch/run.py).

Order, the same for every stage: read and validate the config, check what this machine can run,
prepare the data, the stage's own checks — all before any file or process group exists, so bad
input is one line and exit status 2 — then rank 0 claims the run directory (train/run_dir.py),
the process group starts, and the stage's loop runs. Exit status: 0 done, 2 bad input (a setting,
a data file, a checkpoint, the run directory), 3 non-finite training, 75 preempted (requeue).
"""
from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megads.checkpoint import CheckpointError
from megads.config import Config, ConfigError, load_config
from megads.data import PreparedData, prepare_data
from megads.parallel.mesh import Mesh, build_mesh, layout_mesh
from megads.parallel.plan import plan_layout
from megads.train.launcher_watch import exit_with_launcher
from megads.train.loop import NonFiniteError, TrainingLoop
from megads.train.preemption import PreemptionSignals
from megads.train.run_dir import claim_run_dir


@dataclass(frozen=True)
class Stage:
    """What distinguishes one training stage's command line from another's."""

    usage: str                                                      # printed for --help
    build: Callable[[Config, PreparedData, Mesh], TrainingLoop]     # the stage's loop, on this rank's mesh
    check: Callable[[Config, int, PreparedData], None]              # its own settings checks (raise ConfigError)
    summarize: Callable[[str], str]                                 # the closing lines, from metrics.jsonl


def main(argv: list[str] | None, stage: Stage) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not argv or argv[0] in ("-h", "--help"):
        print(stage.usage)
        return 0 if argv else 2
    if "--print-plan" in argv:
        return print_plan([a for a in argv if a != "--print-plan"])
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if rank != 0:
        logging.getLogger("megads").setLevel(logging.WARNING)
    try:
        cfg = load_config(argv[0], argv[1:]).validate(world_size=world_size).check_machine()
        data = prepare_data(cfg.data, cfg.model.vocab_size)
        stage.check(cfg, world_size, data)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        return refuse(err, rank)
    try:
        with claim_run_dir(cfg, rank):
            init_distributed(world_size)
            with PreemptionSignals() as preemption:
                result = stage.build(cfg, data, build_mesh(cfg.parallel)).fit(preemption)
    except CheckpointError as err:
        return refuse(err, rank)
    except ConfigError as err:          # met by this rank alone: the run directory (rank 0), a reward plug-in
        print(f"megads: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:       # agreed: every rank stops after the same step
        if rank == 0:
            print(f"megads: error: {err}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result["preempted"]:
        return preemption.requeue(result["steps"], rank)
    if rank == 0:
        print(stage.summarize(result["metrics"]))
        print(f"run directory: {result['run_dir']}")
    return 0


def print_plan(argv: list[str]) -> int:
    """`CONFIG --print-plan [--world-size N] [section.key=value ...]`: the parallel plan of the
    layout the config asks for (parallel/plan.py), without starting any process. The world size is
    the smallest the layout allows (pp x lcm(tp, ep): one data-parallel replica, or as many as
    expert parallelism needs) unless --world-size gives it."""
    world_size = None
    if not argv or argv[0].startswith("-"):
        return refuse(ValueError("--print-plan needs the config first: python -m megads.pretrain CONFIG.yaml "
                                 "--print-plan [--world-size N] [section.key=value ...]"), 0)
    if "--world-size" in argv:
        i = argv.index("--world-size")
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if not value.isdigit() or int(value) < 1:
            return refuse(ValueError(f"--world-size needs a number of ranks, got {value!r}"), 0)
        world_size, argv = int(value), argv[:i] + argv[i + 2:]
    try:
        cfg = load_config(argv[0], argv[1:])
        p = cfg.parallel
        world_size = world_size or p.pp * math.lcm(p.tp, p.ep)
        cfg.validate(world_size=world_size)
        print(plan_layout(cfg, layout_mesh(p, world_size)).table())
    except (ConfigError, FileNotFoundError, ValueError) as err:
        return refuse(err, 0)
    return 0


def refuse(err: Exception, rank: int) -> int:
    """Bad input met by every rank alike (settings, data, an agreed checkpoint check): one line
    from rank 0, exit status 2."""
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
