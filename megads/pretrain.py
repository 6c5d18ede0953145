"""Pretraining entry point: `python -m megads.pretrain CONFIG.yaml [section.key=value ...]`,
alone or under torchrun."""
from __future__ import annotations

import json
import logging
import sys

from megads.config import ConfigError, load_config
from megads.data import prepare_data
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
    try:
        cfg = load_config(argv[0], argv[1:]).validate(world_size=1)
        data = prepare_data(cfg.data, cfg.model.vocab_size)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"megads: error: {err}", file=sys.stderr)
        return 2
    try:
        result = Trainer(cfg, data).fit()
    except NonFiniteError as err:
        print(f"megads: error: {err}", file=sys.stderr)
        return 3
    print(summarize(result["metrics"]))
    print(f"run directory: {result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
