"""Held-out revision against training steps, from a run's saved checkpoints: each one is evaluated by eval_duplex
(once; its report is kept and read again on a rerun) and the figures are drawn with their 95% intervals.

    python scripts/checkpoint_curve.py runs/smollm2-duplex/duplex --out runs/smollm2-duplex/curve \\
        --reference checkpoints/duplex-smollm2-135m/eval/results.json -- \\
        --families items letter --modes workspace --kinds one distractor --n-per-family 20 --sweep-per-family 0 \\
        --split test --max-new-tokens 48

Arguments after `--` go to eval_duplex for every checkpoint. `--reference` draws a report's in-band and restart
revision (the frozen backbone's ceiling on the same instances) as dashed lines. Writes OUT/curve.png and
OUT/curve.md (with clean join and two-update revision where the evaluated kinds measure them); each checkpoint's
report lies in OUT/step-N/.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` under run_dir, by step."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return sorted(found)


EXTRA_COLUMNS = {"two_update_accuracy": "two-update", "clean_join": "clean join"}


def evaluated(step_dir: Path, checkpoint: Path, eval_args: list[str]) -> dict:
    """The checkpoint's eval_duplex report, computed once into step_dir."""
    report = step_dir / "results.json"
    if not report.exists():
        import eval_duplex

        eval_duplex.main(["--checkpoint", str(checkpoint), "--out", str(step_dir), *eval_args])
    return json.loads(report.read_text())


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    ours, eval_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a folder holding checkpoint-N folders (a run's OUTPUT/duplex)")
    parser.add_argument("--out", type=Path, required=True, help="where the reports, curve.png and curve.md go")
    parser.add_argument("--reference", type=Path, default=None, help="a results.json with in-band/restart columns")
    args = parser.parse_args(ours)

    rows, extras = [], []
    for step, folder in checkpoints(args.run_dir):
        metrics = evaluated(args.out / f"step-{step}", folder, eval_args)["metrics"]["workspace"]
        rows.append((step, metrics["revision_accuracy"], metrics["distractor_stability"]))
        extras.append({name: metrics[name]["overall"] for name in EXTRA_COLUMNS if name in metrics})
    if not rows:
        raise SystemExit(f"no checkpoint-N folders under {args.run_dir}")
    reference = json.loads(args.reference.read_text())["metrics"] if args.reference else {}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    steps = [step for step, _, _ in rows]
    families = sorted({f for _, revision, _ in rows for f, v in revision["per_family"].items() if v["n"]})
    for name in ["overall", *families]:
        stats = [revision["overall"] if name == "overall" else revision["per_family"][name] for _, revision, _ in rows]
        rates = [100 * s["rate"] for s in stats]
        errors = [[100 * (s["rate"] - s["ci"][0]) for s in stats], [100 * (s["ci"][1] - s["rate"]) for s in stats]]
        ax.errorbar(steps, rates, yerr=errors, marker="o", capsize=3, label=f"workspace, {name}")
    for column, style in (("inband", "--"), ("restart", ":")):
        if reference.get(column, {}).get("revision_accuracy", {}).get("overall", {}).get("n"):
            rate = 100 * reference[column]["revision_accuracy"]["overall"]["rate"]
            ax.axhline(rate, color="gray", linestyle=style, label=f"{column} (frozen backbone), overall")
    ax.set(xlabel="training step", ylabel="held-out revision accuracy (%)", xlim=(0, None), ylim=(-3, 103))
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "curve.png", dpi=120)

    def cell(stat: dict) -> str:
        return f"{100 * stat['rate']:.1f}% ({100 * stat['ci'][0]:.1f}-{100 * stat['ci'][1]:.1f})" if stat["n"] else ""

    extra = [name for name in EXTRA_COLUMNS if any(e.get(name, {}).get("n") for e in extras)]
    lines = [
        "| step | revision, overall | "
        + " | ".join([*families, "distractor stability", *(EXTRA_COLUMNS[name] for name in extra)])
        + " |",
        "|---:|---|" + "---|" * (len(families) + 1 + len(extra)),
    ]
    for (step, revision, stability), more in zip(rows, extras, strict=True):
        cells = [cell(revision["per_family"][f]) for f in families] + [cell(stability["overall"])]
        cells += [cell(more[name]) for name in extra]
        lines.append(f"| {step} | {cell(revision['overall'])} | " + " | ".join(cells) + " |")
    (args.out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return args.out / "curve.png"


if __name__ == "__main__":
    main()
