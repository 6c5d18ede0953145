#!/usr/bin/env python3
"""Plot runs from their metrics.jsonl to one PNG, one line per run.

    python tools/plot_metrics.py loss.png runs/tiny runs/tiny-fp8:"FP8 (emulated)"
    python tools/plot_metrics.py --kind grpo docs/grpo_curves.png runs/grpo-tiny:GRPO runs/grpo-shuffled:"shuffled rewards"

Each run is RUN_DIR or RUN_DIR:LABEL. `--kind pretrain` (the default; also SFT) draws training
and held-out loss, learning rate, gradient norm, tokens/s and the worst expert load ratio;
`--kind grpo` draws held-out greedy accuracy, rollout accuracy, entropy and the rollout-vs-
training log-prob gap.
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# kind -> [(metrics key, panel title, log y axis)]
PANELS = {
    "pretrain": [("loss", "training loss", False), ("valid_loss", "held-out loss", False), ("lr", "learning rate", False),
                 ("grad_norm", "gradient norm", True), ("tokens_per_s", "tokens / s", False),
                 ("max_load_ratio", "max / mean expert load", False)],
    "grpo": [("eval_accuracy", "held-out greedy accuracy", False), ("reward/accuracy", "rollout accuracy (sampled)", False),
             ("entropy", "entropy (nats / token)", False), ("logprob_gap_max", "max |rollout - training| log-prob", True)],
}
# Keys measured now and then rather than every step get markers.
SPARSE = {"valid_loss", "eval_accuracy"}


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"plot_metrics: {path} does not exist; give a run directory (train.run_dir of the run)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(out: str, runs: list[tuple[str, str]], kind: str) -> None:
    panels = PANELS[kind]
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows), squeeze=False)
    axes = axes.flatten()
    for run_dir, label in runs:
        records = read_metrics(run_dir)
        for ax, (key, title, log) in zip(axes, panels):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o" if key in SPARSE else None, markersize=3, label=label)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            if log:
                ax.set_yscale("log")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR:LABEL")
    parser.add_argument("--kind", choices=sorted(PANELS), default="pretrain", help="which panels (default: pretrain)")
    args = parser.parse_args(argv)
    runs = [(r.split(":", 1) + [os.path.basename(r.rstrip("/"))])[:2] for r in args.runs]
    plot(args.out, [(d, label) for d, label in runs], args.kind)


if __name__ == "__main__":
    main()
