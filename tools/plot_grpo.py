#!/usr/bin/env python3
"""Plot GRPO runs from their metrics.jsonl: held-out greedy accuracy, rollout reward, entropy, KL
and the rollout-vs-training log-prob gap, one line per run.

    python tools/plot_grpo.py docs/grpo_curves.png runs/grpo-tiny:GRPO runs/grpo-shuffled:"shuffled rewards"

Each run is RUN_DIR or RUN_DIR:LABEL.
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("eval_accuracy", "held-out greedy accuracy"), ("reward/accuracy", "rollout accuracy (sampled)"),
          ("entropy", "entropy (nats / token)"), ("logprob_gap_max", "max |rollout - training| log-prob"))


def read(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(out: str, runs: list[tuple[str, str]]) -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for run_dir, label in runs:
        records = read(run_dir)
        for ax, (key, title) in zip(axes, PANELS):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if key == "eval_accuracy" else None, markersize=3, label=label)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("GRPO step")
    axes[-1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR:LABEL")
    args = parser.parse_args(argv)
    runs = [(r.split(":", 1) + [os.path.basename(r.rstrip("/"))])[:2] for r in args.runs]
    plot(args.out, [(d, label) for d, label in runs])


if __name__ == "__main__":
    main()
