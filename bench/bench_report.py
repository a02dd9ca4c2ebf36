"""What the benchmark tells its reader: progress lines, the performance targets it checks, the Markdown report and
the latency plot. Pure formatting: nothing here runs a model."""

from __future__ import annotations

import math
import sys
from pathlib import Path

# The performance targets (the specification's). Decode speed only applies to backbones of at least 100M
# parameters: on smaller ones the per-step bookkeeping of generation, not the model, sets the pace.
SPEED_TARGET = 0.97  # a decoding step reading corrections in the workspace >= 0.97x the bare backbone's speed
AFTER_CORRECTION_TARGET = 0.95  # a decoding step after a correction at 1k / 4k context >= 0.95x in-band's
RESTART_TARGETS = {1024: 10.0, 4096: 40.0}  # correction latency at a context of L tokens: restart / workspace
INBAND_TARGET = 1.0  # a correction costs no more than in-band: its latency, and a generate where corrections land
SPEED_TARGET_MIN_PARAMS = 100e6


def log(message: str) -> None:
    """Progress line on stderr (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def fmt(value: float | None, digits: int = 1) -> str:
    """A table cell: thousands separators, `digits` decimals, "n/a" for a missing or NaN figure."""
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def ratio(row: dict, reference: dict, key: str) -> float | None:
    """row[key] / reference[key]; None where either is missing (CPU time on CUDA)."""
    if row.get(key) is None or not reference.get(key):
        return None
    return row[key] / reference[key]


def targets(results: dict) -> list[dict]:
    """The performance targets this benchmark can check, one row each; `met` is None where a target does not
    apply (decode speed on a backbone under 100M parameters, restart latency without a 1024-token context)."""
    decode, latency, meta = results["decode"], results["latency"], results["meta"]
    big = meta["backbone_params"] >= SPEED_TARGET_MIN_PARAMS
    size_note = "" if big else ", applies to backbones >= 100M params"
    rows = []

    def speed_row(figure: str, speed: float, target: float = SPEED_TARGET) -> dict:
        met = speed >= target if big else None
        return {"figure": figure + size_note, "target": f">= {target}x", "measured": f"{speed:.3f}x", "met": met}

    # a decoding step that reads the corrections (the median step: most steps land nothing) ...
    speed = ratio(decode["bare"], decode["duplex+updates"], "median_step_ms")
    rows.append(speed_row("decode step reading corrections, duplex / bare (median step)", speed))
    # ... and the whole generate, the steps where corrections land included, against the same corrections in-band
    for key, clock in (("decode_tok_s", "wall time"), ("cpu_time_tok_s", "CPU time")):
        cost = ratio(decode["inband+updates"], decode["duplex+updates"], key)
        if cost is not None:
            rows.append(
                {
                    "figure": f"decode with corrections landing, workspace / inband time ({clock})",
                    "target": f"<= {INBAND_TARGET}x",
                    "measured": f"{cost:.3f}x",
                    "met": cost <= INBAND_TARGET,
                }
            )
    for length, row in latency.items():
        if row.get("decode_speed_after_correction") is not None:
            figure = f"decode speed after a correction at {length} tokens, workspace / inband"
            rows.append(speed_row(figure, row["decode_speed_after_correction"], AFTER_CORRECTION_TARGET))
    for length, target in RESTART_TARGETS.items():
        row = latency.get(length, latency.get(str(length)))  # int keys in memory, str once read back from JSON
        if row is None:
            continue
        rows.append(
            {
                "figure": f"correction latency, restart / workspace at {length} tokens",
                "target": f">= {target:g}x",
                "measured": f"{row['restart_over_workspace']:.2f}x",
                "met": row["restart_over_workspace"] >= target,
            }
        )
    worst = max(row["workspace_over_inband"] for row in latency.values())
    rows.append(
        {
            "figure": "correction latency, workspace / inband (worst context)",
            "target": f"<= {INBAND_TARGET}x",
            "measured": f"{worst:.2f}x",
            "met": worst <= INBAND_TARGET,
        }
    )
    return rows


def markdown(results: dict) -> str:
    """The human-readable report of a run's `results` (as written to JSON)."""
    meta, decode, latency = results["meta"], results["decode"], results["latency"]
    duplex_config = meta["duplex_config"]
    lines = [
        f"## Duplex benchmark: {meta['shape']} ({meta['arch']}, {meta['backbone_params'] / 1e6:.1f}M params, "
        f"{'real' if meta['real_weights'] else 'random'} weights), {meta['device']} {meta['dtype']}, "
        f"{meta['threads']} threads",
        "",
        f"Duplex: {duplex_config['num_slots']} slots, {duplex_config['encoder_layers']} encoder layers, "
        f"{len(duplex_config['adapter_layers'])} workspace adapters. `duplex`: no update; `duplex+updates`: "
        f"{len(meta['updates_in_decode'])} corrections of {meta['correction_len']} tokens land in the workspace "
        "during the run (the median step reads them); `inband+updates`: the same corrections spliced in-band.",
        "",
        f"### Decode (batch 1, greedy, {meta['new_tokens']} new tokens after a {meta['prompt_len']}-token prompt, "
        f"median of {meta['repeats']}, interleaved)",
        "",
        "| variant | decode tok/s | ratio vs bare | CPU-time tok/s | ratio (CPU time) | median step ms | "
        "end-to-end tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    bare = decode["bare"]
    for name, row in decode.items():
        lines.append(
            f"| {name} | {fmt(row['decode_tok_s'])} | {fmt(ratio(row, bare, 'decode_tok_s'), 3)}x | "
            f"{fmt(row['cpu_time_tok_s'])} | {fmt(ratio(row, bare, 'cpu_time_tok_s'), 3)}x | "
            f"{fmt(row['median_step_ms'], 2)} | {fmt(row['end_to_end_tok_s'])} |"
        )
    steps = results["paired_steps"]
    lines += [
        "",
        f"Paired single-token forward steps (bare and duplex alternating step by step, {meta['step_samples']} "
        f"samples, prompt {meta['prompt_len']}): bare {fmt(steps['bare']['step_ms'], 2)} ms, duplex "
        f"{fmt(steps['duplex']['step_ms'], 2)} ms; duplex / bare speed (median of paired ratios) "
        f"**{fmt(steps['duplex']['paired_ratio'], 3)}x**.",
    ]
    lines += [
        "",
        f"### Correction latency ({meta['correction_len']}-token correction landing after a context of L tokens, "
        f"median of {meta['repeats']})",
        "",
        "| context L | workspace ms | inband ms | restart ms | restart / workspace | workspace / inband | "
        "decode step after it, workspace / inband ms | decode speed, workspace / inband |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for length, row in latency.items():
        lines.append(
            f"| {length} | {fmt(row['workspace_ms'], 2)} | {fmt(row['inband_ms'], 2)} | {fmt(row['restart_ms'], 2)} | "
            f"{fmt(row['restart_over_workspace'], 2)}x | {fmt(row['workspace_over_inband'], 2)}x | "
            f"{fmt(row['decode_step_ms'], 2)} / {fmt(row.get('inband_decode_step_ms'), 2)} | "
            f"{fmt(row.get('decode_speed_after_correction'), 3)}x |"
        )
    memory, params = results["memory"], results["params"]
    unit = "CUDA max_memory_allocated" if meta["device"].startswith("cuda") else "RSS high-water"
    lines += [
        "",
        "### Memory and parameters",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| backbone parameters (frozen) | {params['frozen']:,} |",
        f"| duplex parameters (trainable) | {params['trainable']:,} ({100 * params['trainable_fraction']:.2f}%) |",
        f"| adapter-only checkpoint (adapter_model.safetensors) | {fmt(params['adapter_weights_mb'], 2)} MB |",
        f"| adapter-only checkpoint folder | {fmt(params['adapter_folder_mb'], 2)} MB |",
        f"| weights in memory, bare / duplex | {fmt(params['bare_weights_mb'])} / "
        f"{fmt(params['duplex_weights_mb'])} MB |",
    ]
    for name, value in memory.items():
        lines.append(f"| peak added memory ({unit}), {name} | {fmt(value)} MB |")
    if results.get("placement"):
        lines += [
            "",
            "### Adapter placement (decode, no updates, same run; paired steps read a filled workspace)",
            "",
            "| configuration | adapters | trainable params | decode tok/s | ratio vs bare | "
            "ratio (CPU time) | paired step ratio |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in results["placement"]:
            lines.append(
                f"| {row['name']} | {row.get('num_adapters', '-')} | "
                f"{row.get('trainable_params', 0):,} | {fmt(row['decode_tok_s'])} | "
                f"{fmt(row['ratio_vs_bare'], 3)}x | {fmt(row['cpu_time_ratio_vs_bare'], 3)}x | "
                f"{fmt(row['paired_step_ratio'], 3)}x |"
            )
    lines += ["", "### Targets", "", "| figure | target | measured | met |", "|---|---|---:|---|"]
    for row in results["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(f"| {row['figure']} | {row['target']} | {row['measured']} | {met} |")
    return "\n".join(lines) + "\n"


def plot(latency: dict, modes: tuple[str, ...], path: Path, title: str) -> bool:
    """Correction latency vs context length, one line per mode in `modes` and the plain decode step, log y.
    False (and a warning) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return False
    lengths = [int(length) for length in latency]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, marker in zip(modes, "osd", strict=True):
        ax.plot(lengths, [latency[length][f"{mode}_ms"] for length in latency], marker=marker, label=mode)
    ax.plot(lengths, [latency[length]["decode_step_ms"] for length in latency], ":", color="grey", label="decode step")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(length) for length in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("correction latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
