"""Pretraining entry point: `python -m megads.pretrain CONFIG.yaml [section.key=value ...]`,
alone or under torchrun (launch/run.py pretrain ...)."""
from __future__ import annotations

import json
import sys

from megads import cli
from megads.config import Config
from megads.data import PreparedData, check_data_fits
from megads.parallel.data import deepspeed_config
from megads.parallel.mesh import layout_mesh
from megads.train.trainer import Trainer


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


def check(cfg: Config, world_size: int, data: PreparedData) -> None:
    """The DeepSpeed settings megads generates for this layout, and enough data for one global batch."""
    if cfg.parallel.deepspeed_config:
        deepspeed_config(cfg, layout_mesh(cfg.parallel, world_size))
    check_data_fits(data, cfg.data, cfg.train.seq_len, cfg.train.global_batch)


PRETRAIN = cli.Stage(__doc__, Trainer, check, summarize)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, PRETRAIN)


if __name__ == "__main__":
    sys.exit(main())
