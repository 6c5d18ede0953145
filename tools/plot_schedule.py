"""Draw a pipeline schedule's timeline (ranks x time) to PNG.

    python tools/plot_schedule.py dualpipe --pp 8 --micro-batches 20 --out docs/dualpipe_pp8.png
    python tools/plot_schedule.py 1f1b --pp 4 --micro-batches 8 --times 1,2,0 --out 1f1b.png
    python tools/plot_schedule.py dualpipe --pp 4 --micro-batches 8 --measured spans.json --out run.png

Cells are timed by the simulator from F, B (input backward), W (weight backward) and F&B
(overlapped pair) durations, or taken from a run's measured spans (JSON: per rank a list of
[action, start, end], action as printed by megads, e.g. "F0.3", "F0.3&B1.2"). Forward cells are
coloured by chunk, input-backward / full-backward / weight-backward / overlapped cells by kind;
idle time (the bubble) is shaded. Each cell is labelled with its micro-batch.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from megads.parallel.pipeline.schedules import Action, build_schedule  # noqa: E402
from megads.parallel.pipeline.simulator import Times, Timeline, simulate  # noqa: E402

COLOURS = {("F", 0): "#f5b971", ("F", 1): "#f7d9a8", ("B", 0): "#7fb3d5", ("B", 1): "#b9d7ea",
           ("BW", 0): "#5d8fc9", ("BW", 1): "#8fb4dd", ("W", 0): "#8bc98b", ("W", 1): "#b9e0b9",
           ("FB", 0): "#c39bd3", ("FB", 1): "#dcc3e6"}
LEGEND = [("F", "forward"), ("B", "backward for inputs"), ("BW", "full backward"), ("W", "backward for weights"),
          ("FB", "overlapped F&B")]


def parse_action(text: str) -> Action:
    pair = re.fullmatch(r"F(\d+)\.(\d+)&B(\d+)\.(\d+)", text)
    if pair:
        c, m, bc, bm = map(int, pair.groups())
        return Action("FB", c, m, bc, bm)
    kind, c, m = re.fullmatch(r"([A-Z_]+?)(\d+)\.(\d+)", text).groups()
    return Action(kind, int(c), int(m))


def load_measured(path: str) -> Timeline:
    with open(path) as f:
        ranks = json.load(f)
    return Timeline([[(parse_action(a), float(s), float(e)) for a, s, e in rank] for rank in ranks])


def draw(timeline: Timeline, title: str, out: str) -> None:
    pp, span = len(timeline.spans), timeline.makespan
    fig, ax = plt.subplots(figsize=(max(10.0, span * 0.22), 0.55 * pp + 1.2))
    for rank, cells in enumerate(timeline.spans):
        y = pp - 1 - rank
        ax.barh(y, span, left=0, height=0.9, color="#eeeeee", hatch="///", edgecolor="#cccccc", linewidth=0)
        for a, start, end in cells:
            if (a.kind, a.chunk) not in COLOURS:         # sends and receives take no time
                continue
            ax.barh(y, end - start, left=start, height=0.9, color=COLOURS[(a.kind, a.chunk)], edgecolor="black",
                    linewidth=0.4)
            label = f"{a.mb}|{a.b_mb}" if a.kind == "FB" else str(a.mb)
            ax.text((start + end) / 2, y, label, ha="center", va="center", fontsize=6)
    ax.set_yticks(range(pp))
    ax.set_yticklabels([f"rank {r}" for r in reversed(range(pp))])
    ax.set_xlim(0, span)
    ax.set_xlabel("time")
    handles = [Patch(color=COLOURS[(k, 0)], label=name) for k, name in LEGEND] + \
              [Patch(facecolor="#eeeeee", hatch="///", edgecolor="#cccccc", label="bubble")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=6, fontsize=8, frameon=False)
    bubbles = [timeline.bubble(r) for r in range(pp)]
    ax.set_title(f"{title}   (bubble per rank: max {max(bubbles):g}, mean {sum(bubbles) / pp:g})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("schedule", choices=["1f1b", "dualpipe", "dualpipev"])
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--micro-batches", type=int, required=True)
    parser.add_argument("--times", default="1,1,1,2",
                        help="F,B,W[,F&B] durations for the simulator (F&B defaults to F+B+W)")
    parser.add_argument("--measured", help="JSON of measured spans per rank instead of the simulator's")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    schedule = build_schedule(args.schedule, args.pp, args.micro_batches)
    if args.measured:
        timeline = load_measured(args.measured)
    else:
        values = [float(v) for v in args.times.split(",")]
        timeline = simulate(schedule, Times(*values[:3], values[3] if len(values) > 3 else None))
    draw(timeline, f"{args.schedule}, pp={args.pp}, {args.micro_batches} micro-batches", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
