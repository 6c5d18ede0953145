"""GRPO post-training entry point: `python -m megads.grpo CONFIG.yaml [section.key=value ...]`,
alone or under torchrun (launch/run.py grpo ...). Starts from the checkpoint `grpo.init`
(any layout), writes metrics.jsonl / TensorBoard under train.run_dir and saves megads
checkpoints under checkpoint.dir."""
from __future__ import annotations

import sys

from megads.rl.cli import main as run
from megads.rl.grpo_trainer import GRPOTrainer


def main(argv: list[str] | None = None) -> int:
    return run(argv, GRPOTrainer, __doc__)


if __name__ == "__main__":
    sys.exit(main())
