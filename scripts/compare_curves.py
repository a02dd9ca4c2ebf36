"""Held-out revision of several training runs side by side: against steps and against training wall time.

    python scripts/compare_curves.py runs/exp/A=default runs/exp/B="on-policy" --out docs/channel-curves.png

Each run is a `--output_dir` of `train_duplex.py --curve_steps N` (its `duplex/curves.jsonl`), optionally with a label
after `=`. The frozen backbone's in-band revision (measured once per run) is drawn as a dashed line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_duplex import read_curves


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR=label")
    parser.add_argument("--split", default="test")
    parser.add_argument("--metric", default="revision_accuracy")
    parser.add_argument("--out", default="docs/channel-curves.png")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    inband = []
    for spec in args.runs:
        path, _, label = spec.partition("=")
        records = read_curves(Path(path) / "duplex" / "curves.jsonl")
        points = [
            (r["step"], r["train_seconds"] / 60, 100 * columns["workspace"][args.metric]["overall"])
            for r in records
            if (columns := r["splits"].get(args.split)) and args.metric in columns.get("workspace", {})
        ]
        inband += [
            100 * columns["inband"][args.metric]["overall"]
            for r in records
            if (columns := r["splits"].get(args.split)) and args.metric in columns.get("inband", {})
        ]
        if points:
            steps, minutes, values = zip(*points, strict=True)
            by_step.plot(steps, values, marker="o", label=label or path)
            by_time.plot(minutes, values, marker="o", label=label or path)
    for ax, xlabel in ((by_step, "step"), (by_time, "minutes of training")):
        if inband:
            ax.axhline(sum(inband) / len(inband), color="gray", linestyle="--", label="in-band (frozen backbone)")
        ax.set(xlabel=xlabel, ylabel=f"held-out {args.metric.replace('_', ' ')} (%)", ylim=(-3, 103))
    by_step.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(out)
    return out


if __name__ == "__main__":
    main()
