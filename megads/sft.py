"""Supervised fine-tuning entry point: `python -m megads.sft CONFIG.yaml [section.key=value ...]`,
alone or under torchrun (launch/run.py sft ...). Trains on the synthetic problems of
`sft.tiers` with the loss on the response tokens only, starting from `sft.init`."""
from __future__ import annotations

import sys

from megads.rl.cli import main as run
from megads.rl.sft import SFTTrainer


def main(argv: list[str] | None = None) -> int:
    return run(argv, SFTTrainer, __doc__)


if __name__ == "__main__":
    sys.exit(main())
