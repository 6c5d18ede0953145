"""The post-training stages (`python -m megads.sft`, `python -m megads.grpo`) on the one command
line of megads/cli.py: their settings checks and their summary."""
from __future__ import annotations

import json

from megads import cli
from megads.config import Config, ConfigError
from megads.data import PreparedData
from megads.rl.run import PolicyRun


def summarize(metrics_path: str) -> str:
    """Held-out greedy accuracy at the first and last evaluation."""
    with open(metrics_path) as f:
        evals = [r for r in map(json.loads, filter(str.strip, f)) if "eval_accuracy" in r]
    if not evals:
        return "no evaluation recorded"
    first, last = evals[0], evals[-1]
    return (f"held-out greedy accuracy {first['eval_accuracy']:.3f} (step {first['step']}) -> "
            f"{last['eval_accuracy']:.3f} (step {last['step']})")


def stage(trainer_cls: type[PolicyRun], usage: str) -> cli.Stage:
    def check_stage(cfg: Config, world_size: int, data: PreparedData) -> None:
        settings = getattr(cfg, trainer_cls.section)
        cfg.validate_generation_layout(world_size, settings.eval_problems)
        if trainer_cls.section == "grpo":
            g = cfg.grpo
            cfg.validate_generation_layout(world_size, g.prompts_per_step)
            local = g.prompts_per_step // (world_size // cfg.parallel.tp) * g.group_size
            if local % g.micro_batch and g.micro_batch < local:
                raise ConfigError(f"grpo.micro_batch={g.micro_batch} does not divide the {local} responses per DP "
                                  f"rank (grpo.prompts_per_step / dp * grpo.group_size)")

    return cli.Stage(usage, lambda cfg, data, mesh: trainer_cls(cfg, data.tokenizer, mesh), check_stage, summarize)


def main(argv: list[str] | None, trainer_cls: type[PolicyRun], usage: str) -> int:
    return cli.main(argv, stage(trainer_cls, usage))
