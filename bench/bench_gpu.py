"""The Qwen3-1.7B shape on a GPU: a bf16 duplex training step, and decode speed with and without corrections.

Random weights in the Qwen3-1.7B shape (`backbone_shapes.py`, the `text_config` of this repository's config.json):
the backbone is built on the meta device and materialised on the GPU (its own weight init, no CPU copy); the duplex
modules over it take the duplex fields of config.json (all 28 layers adapted, 32 slots, a 4-layer update encoder),
as after training (`bench_models.build_duplex`: open gates, non-zero output projections). In one run, side by side:

  train   a training step (frozen backbone, duplex modules trainable, AdamW) under bf16 autocast, with activation
          checkpointing, on a teacher-forced batch (`--train-batch` rows of `--train-seq` tokens) with
          `--train-corrections` corrections per row, beside the same step on the same batch without corrections:
          tokens/s and peak GPU memory (`torch.cuda.max_memory_allocated`, the weights and optimizer state included)
  decode  greedy single-token steps on a DynamicCache after a prefill of `--contexts` tokens: the bare backbone, the
          duplex model without corrections, and the duplex model with one correction (landing at the first new
          token, placed the way `generate(..., updates=...)` places it: a `ContextWorkspace` whose slots enter the
          first step); tokens/s and the ratios to the bare backbone, all three interleaved step block by step block

The GPU run (well under 5 minutes on one H100; progress on stderr, the table on stdout):

    python bench/bench_gpu.py --out runs/bench_gpu.json

Its CPU smoke run (what tests/test_bench.py runs; seconds):

    python bench/bench_gpu.py --device cpu --shape micro --dtype float32 --train-seq 64 --train-batch 2 \\
        --contexts 128 --decode-tokens 8 --repeats 2 --threads 1

(fp32 on CPU: there a bf16 backbone decoding with a correction fails, the CPU fused read returning an fp32 output;
the tests run the GPU's bf16 code path on CPU with the reference read instead.)

Only ratios measured in the same run compare; figures from another card or another run do not.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for folder in (ROOT, BENCH):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from bench_models import bench_backbone_config, build_duplex, count_params, random_ids  # noqa: E402
from bench_report import fmt, log  # noqa: E402
from bench_timing import median, rotated, synchronize  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel  # noqa: E402

from backbone_shapes import REPO_CONFIG, SHAPES  # noqa: E402
from generation_duplex import NO_UPDATE, pack_updates, update_position  # noqa: E402
from modeling_duplex import DuplexForCausalLM  # noqa: E402

# The duplex fields taken from config.json. Those sized for Qwen3-1.7B (28 adapted layers, 16 encoder heads, a
# 4096-wide encoder MLP) apply to that shape only; other shapes take the config's defaults for them.
DUPLEX_FIELDS = ("num_slots", "workspace_update", "encoder_layers", "decision_loss_weight", "initializer_range")
SIZED_FIELDS = ("adapter_layers", "encoder_heads", "encoder_intermediate_size")
DECODE_VARIANTS = ("bare", "duplex", "duplex+correction")
TRAIN_VARIANTS = ("with corrections", "without corrections")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen3-1.7b")
    parser.add_argument("--device", default="cuda", help="cuda (cuda:N) or cpu (the smoke run)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="the backbone's weights")
    parser.add_argument("--train-seq", type=int, default=2048, help="tokens per training row")
    parser.add_argument("--train-batch", type=int, default=4, help="rows per training step")
    parser.add_argument("--train-corrections", type=int, default=2, help="corrections per training row")
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps per variant (after 1 warm-up)")
    parser.add_argument("--no-checkpointing", action="store_true", help="train without activation checkpointing")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384], help="decode context lengths")
    parser.add_argument("--decode-tokens", type=int, default=32, help="greedy steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per decode variant and context")
    parser.add_argument("--correction-len", type=int, default=16, help="tokens per correction")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.train_seq < 8 or args.train_batch < 1 or args.train_steps < 1 or args.train_corrections < 0:
        parser.error("need --train-seq >= 8, --train-batch >= 1, --train-steps >= 1, --train-corrections >= 0")
    if min(args.contexts) < 4 or args.decode_tokens < 1 or args.repeats < 1 or args.correction_len < 1:
        parser.error("need --contexts >= 4, --decode-tokens >= 1, --repeats >= 1 and --correction-len >= 1")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------


def duplex_fields(shape: str) -> dict:
    """The duplex configuration of this repository's config.json (its Qwen3-1.7B-sized fields for that shape only)."""
    saved = json.loads(REPO_CONFIG.read_text())
    names = DUPLEX_FIELDS + (SIZED_FIELDS if shape == "qwen3-1.7b" else ())
    return {name: saved[name] for name in names if name in saved}


def materialised_backbone(shape: str, device: torch.device, dtype: torch.dtype, min_positions: int) -> PreTrainedModel:
    """The bare causal LM of `shape`, built on the meta device and materialised on `device` (random weights by the
    backbone's own init, seed 0; the tied head re-tied, the rotary tables recomputed), in eval mode."""
    config = bench_backbone_config(shape)
    config.max_position_embeddings = max(config.max_position_embeddings, min_positions)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        backbone = AutoModelForCausalLM.from_config(config, dtype=dtype)
    backbone.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        backbone.apply(backbone._init_weights)
    backbone.tie_weights()
    return backbone.eval()


def memory_mb(device: torch.device) -> float | None:
    """Memory the CUDA allocator holds now, MB; None on CPU."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    """`torch.cuda.max_memory_allocated` since the last `reset_peak`, MB; None on CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


# ----------------------------------------------------------------------------------------------------------------------
# Training step
# ----------------------------------------------------------------------------------------------------------------------


def training_batch(args: argparse.Namespace, vocab: int, device: torch.device) -> dict[str, dict]:
    """The teacher-forced batch, with its corrections (spread over each row, a different spot per row; all of them
    known corrections) and without them."""
    rows, length, count = args.train_batch, args.train_seq, args.train_corrections
    ids = torch.cat([random_ids(length, vocab, 1000 + b, device) for b in range(rows)])
    plain = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    updates = []
    for b in range(rows):
        ats = sorted({max(1, min(length - 1, (k + 1) * length // (count + 1) - 3 * b)) for k in range(count)})
        updates.append([(at, random_ids(args.correction_len, vocab, 2000 + 10 * b + k, device)[0].tolist())
                        for k, at in enumerate(ats)])  # fmt: skip
    packed = {k: v.to(device) for k, v in pack_updates(updates).items()}
    packed["update_is_correction"] = packed["update_positions"] != NO_UPDATE
    return {"with corrections": {**plain, **packed}, "without corrections": plain}


def bench_train(model: DuplexForCausalLM, args: argparse.Namespace, device: torch.device) -> dict:
    """Interleaved training steps with and without corrections -> per variant: median step seconds, tokens/s, peak
    memory, the losses, and whether the duplex gradients were non-zero."""
    batches = training_batch(args, model.config.text_config.vocab_size, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)
    model.train()
    checkpointing = not args.no_checkpointing
    if checkpointing:
        # gradient_checkpointing_enable under its transformers 5 name (the old one is a deprecated alias)
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    tokens = args.train_batch * args.train_seq
    resident = memory_mb(device)

    def step(batch: dict) -> tuple[float, float, float]:
        """One training step -> (seconds, loss, norm of the duplex gradients)."""
        synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        loss = loss.detach()
        optimizer.step()
        synchronize(device)
        seconds = time.perf_counter() - start
        grads = [p.grad.detach().float().norm() for p in trainable if p.grad is not None]
        grad_norm = float(torch.stack(grads).norm()) if grads else 0.0
        return seconds, loss.item(), grad_norm

    results: dict[str, dict] = {}
    times: dict[str, list[float]] = {v: [] for v in TRAIN_VARIANTS}
    peaks: dict[str, float | None] = dict.fromkeys(TRAIN_VARIANTS)
    losses: dict[str, list[float]] = {v: [] for v in TRAIN_VARIANTS}
    grad_norms: dict[str, list[float]] = {v: [] for v in TRAIN_VARIANTS}
    failed: dict[str, str] = {}
    for variant in TRAIN_VARIANTS:  # warm-up (the optimizer's state is created here)
        try:
            seconds, loss, _ = step(batches[variant])
            log(f"[train] warm-up {variant}: {seconds:.2f} s, loss {loss:.3f}")
        except torch.OutOfMemoryError as error:
            failed[variant] = f"out of memory: {str(error).splitlines()[0]}"
            log(f"[train] {variant}: {failed[variant]}")
            optimizer.zero_grad(set_to_none=True)
    for r in range(args.train_steps):
        for variant in rotated(list(TRAIN_VARIANTS), r):
            if variant in failed:
                continue
            reset_peak(device)
            seconds, loss, grad_norm = step(batches[variant])
            peak = peak_mb(device)
            peaks[variant] = peak if peaks[variant] is None else max(peaks[variant], peak)
            times[variant].append(seconds)
            losses[variant].append(loss)
            grad_norms[variant].append(grad_norm)
        log(f"[train] step {r + 1}/{args.train_steps}: " + ", ".join(
            f"{v} {times[v][-1]:.2f} s" for v in TRAIN_VARIANTS if times[v]))  # fmt: skip
    for variant in TRAIN_VARIANTS:
        if variant in failed:
            results[variant] = {"error": failed[variant]}
            continue
        step_s = median(times[variant])
        results[variant] = {
            "step_s": step_s,
            "tokens_per_s": tokens / step_s,
            "peak_memory_mb": peaks[variant],
            "steps_s": times[variant],
            "losses": losses[variant],
            "duplex_grad_norm": median(grad_norms[variant]),
        }
    with_c, without = results["with corrections"], results["without corrections"]
    both = "step_s" in with_c and "step_s" in without
    if checkpointing:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    model.eval()
    return {
        "batch": args.train_batch,
        "seq_len": args.train_seq,
        "tokens_per_step": tokens,
        "corrections_per_row": args.train_corrections,
        "correction_len": args.correction_len,
        "activation_checkpointing": checkpointing,
        "autocast": "bfloat16" if args.dtype == "bfloat16" else None,
        "optimizer": "AdamW",
        "resident_before_mb": resident,
        "variants": results,
        "speed_with_over_without": without["step_s"] / with_c["step_s"] if both else None,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------------------------------


class Decoder:
    """One decode variant after a prefill of `prompt`: the first new token's step (where a correction lands: its
    slots enter that pass), then timed blocks of greedy single-token steps, the cache cropped back after each block
    so that every block starts from the same state."""

    def __init__(self, model: PreTrainedModel, prompt: torch.Tensor, correction: list[int] | None):
        device = prompt.device
        self.model, self.device, self.kwargs = model, device, {}
        config = model.config.text_config if isinstance(model, DuplexForCausalLM) else model.config
        self.cache = DynamicCache(config=config)
        reset_peak(device)
        synchronize(device)
        start = time.perf_counter()
        logits = model(input_ids=prompt, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        token.tolist()
        self.prefill_s = time.perf_counter() - start
        if correction is not None:  # lands at new token 1, as generate(updates=[(1, correction)]) lands it
            position = update_position(prompt.shape[1], 1)
            packed = {k: v.to(device) for k, v in pack_updates([[(position, correction)]]).items()}
            versions, decision = model.workspace_versions(1, **packed)
            if not bool((decision >= 0).all()):
                raise RuntimeError("the benchmark's correction was decided a backchannel: nothing would be read")
            context = versions.placed_in_context()
            context.keep = True  # its slots' keys/values stay for the following steps, as in generate
            self.kwargs = {"context_workspace": context}
        synchronize(device)
        start = time.perf_counter()
        self.first_logits = self.forward(token)
        self.token = self.first_logits.argmax(-1, keepdim=True)
        self.token.tolist()
        self.first_step_s = time.perf_counter() - start
        self.length = self.cache.get_seq_length()
        self.peak_mb = peak_mb(device)

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token, past_key_values=self.cache, use_cache=True, logits_to_keep=1, **self.kwargs)
        return out.logits[:, -1]

    def block(self, steps: int) -> list[float]:
        """`steps` greedy single-token steps (each waits for its token on the host, as generate does) -> seconds of
        each; the cache is then cropped back."""
        token, seconds = self.token, []
        for _ in range(steps):
            synchronize(self.device)
            start = time.perf_counter()
            token = self.forward(token).argmax(-1, keepdim=True)
            token.tolist()
            seconds.append(time.perf_counter() - start)
        self.cache.crop(-steps)  # transformers 5: a negative count of tokens to remove
        if self.cache.get_seq_length() != self.length:
            raise RuntimeError(f"the cache holds {self.cache.get_seq_length()} tokens after a block, not {self.length}")
        return seconds


def bench_decode(
    model: DuplexForCausalLM, args: argparse.Namespace, device: torch.device, partial: dict, out: Path | None
) -> dict:
    """Per context length: the three DECODE_VARIANTS interleaved block by block -> tokens/s, ratios to bare."""
    base = model.get_base_model()
    vocab = model.config.text_config.vocab_size
    correction = random_ids(args.correction_len, vocab, 7, torch.device("cpu"))[0].tolist()
    models: dict[str, tuple[PreTrainedModel, list[int] | None]] = {
        "bare": (base, None),
        "duplex": (model, None),
        "duplex+correction": (model, correction),
    }
    results: dict = {}
    partial["decode"] = {"decode_tokens": args.decode_tokens, "repeats": args.repeats, "contexts": results}
    for length in sorted(args.contexts):
        results[length] = guarded(f"decode {length}", lambda length=length: decode_context(models, length, args))
        write(partial, out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return partial["decode"]


def decode_context(models: dict, length: int, args: argparse.Namespace) -> dict:
    """The DECODE_VARIANTS after a `length`-token prompt, interleaved block by block."""
    model = models["duplex"][0]
    device, vocab = model.device, model.config.text_config.vocab_size
    with torch.inference_mode():
        prompt = random_ids(length, vocab, length, device)
        decoders: dict[str, Decoder] = {}
        for name, (which, update) in models.items():
            decoders[name] = Decoder(which, prompt, update)
            log(f"[decode {length}] {name}: prefill {decoders[name].prefill_s:.2f} s, "
                f"first step {1000 * decoders[name].first_step_s:.1f} ms")  # fmt: skip
        for decoder in decoders.values():  # warm-up block
            decoder.block(min(4, args.decode_tokens))
        rates: dict[str, list[float]] = {n: [] for n in decoders}
        for r in range(args.repeats):
            for name in rotated(list(decoders), r):
                rates[name].append(args.decode_tokens / sum(decoders[name].block(args.decode_tokens)))
            log(f"[decode {length}] block {r + 1}/{args.repeats}: "
                + ", ".join(f"{n} {rates[n][-1]:.1f} tok/s" for n in decoders))  # fmt: skip
        rows = {
            name: {
                "tokens_per_s": median(rates[name]),
                "blocks_tokens_per_s": rates[name],
                "prefill_s": decoders[name].prefill_s,
                "first_step_ms": 1000 * decoders[name].first_step_s,
                "peak_memory_mb": decoders[name].peak_mb,
            }
            for name in decoders
        }
        for name, row in rows.items():
            row["ratio_vs_bare"] = row["tokens_per_s"] / rows["bare"]["tokens_per_s"]
            row["paired_ratio_vs_bare"] = median(
                [mine / bare for mine, bare in zip(rates[name], rates["bare"], strict=True)]
            )
        # the read is real: the correction changes the first step's logits
        first = decoders["duplex+correction"].first_logits.float()
        rows["duplex+correction"]["first_step_logit_change"] = float(
            (first - decoders["duplex"].first_logits.float()).abs().max()
        )
        rows["duplex"]["first_step_logit_change_vs_bare"] = float(
            (decoders["duplex"].first_logits.float() - decoders["bare"].first_logits.float()).abs().max()
        )
        return rows


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"## Duplex on the {meta['shape']} shape: {meta['device_name']} ({meta['device']}, {meta['dtype']})",
        "",
    ]
    train = results.get("train")
    if train:
        lines += [
            f"Training step: batch {train['batch']} x {train['seq_len']} tokens, {train['corrections_per_row']} "
            f"corrections per row, activation checkpointing {'on' if train['activation_checkpointing'] else 'off'}, "
            f"autocast {train['autocast']}, AdamW over the duplex modules",
            "",
            "| training step | step (s) | tokens/s | peak memory (MB) |",
            "|---|---:|---:|---:|",
        ]
        for name, row in train["variants"].items():
            if "error" in row:
                lines.append(f"| {name} | {row['error']} | | |")
            else:
                lines.append(
                    f"| {name} | {fmt(row['step_s'], 3)} | {fmt(row['tokens_per_s'])} | {fmt(row['peak_memory_mb'])} |"
                )
        if train["speed_with_over_without"] is not None:
            lines += ["", f"Speed with corrections / without: {train['speed_with_over_without']:.3f}x"]
        lines.append("")
    decode = results.get("decode")
    if decode:
        lines += [
            f"Decode: {decode['decode_tokens']} greedy steps per block, median of {decode['repeats']} blocks",
            "",
            "| context | variant | tokens/s | vs bare | paired vs bare | prefill (s) | first step (ms) | peak (MB) |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for length, rows in decode["contexts"].items():
            for name, row in rows.items():
                lines.append(
                    f"| {length} | {name} | {fmt(row['tokens_per_s'])} | {row['ratio_vs_bare']:.3f}x | "
                    f"{row['paired_ratio_vs_bare']:.3f}x | {fmt(row['prefill_s'], 2)} | {fmt(row['first_step_ms'])} | "
                    f"{fmt(row['peak_memory_mb'])} |"
                )
    return "\n".join(lines) + "\n"


def guarded(phase: str, work: Callable[[], dict]) -> dict:
    """A phase's results, or {"error": ...} where it failed: one unattended run reports every phase it can."""
    try:
        return work()
    except Exception as error:  # reported in the results, the traceback on stderr
        log(f"[{phase}] FAILED:\n{traceback.format_exc()}")
        return {"error": f"{type(error).__name__}: {error}"}


def write(results: dict, out: Path | None) -> None:
    """The results so far as JSON (after each phase, so that a run cut short keeps what it measured)."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str))
        log(f"wrote {out}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (the CPU smoke run: --device cpu --shape micro)")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, argv, device)
    finally:
        torch.set_num_threads(threads)  # main() may run in-process (the tests): leave torch as it was


def run(args: argparse.Namespace, argv: list[str] | None, device: torch.device) -> dict:
    started = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    longest = max([*args.contexts, args.train_seq]) + 64  # room for the decode steps
    backbone = materialised_backbone(args.shape, device, dtype, longest)
    fields = duplex_fields(args.shape)
    model = build_duplex(backbone, **fields)
    trainable, total = model.get_nb_trainable_parameters()
    log(f"{args.shape}: backbone {count_params(backbone) / 1e6:.1f}M params ({args.dtype}), duplex "
        f"+{trainable / 1e6:.1f}M (fp32), on {device}; built in {time.perf_counter() - started:.1f} s")  # fmt: skip
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    results: dict = {
        "meta": {
            "shape": args.shape,
            "device": str(device),
            "device_name": device_name,
            "dtype": args.dtype,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "backbone_params": count_params(backbone),
            "duplex_trainable_params": trainable,
            "total_params": total,
            "duplex_config": {k: getattr(model.config, k) for k in (*DUPLEX_FIELDS, *SIZED_FIELDS)},
            "memory_after_build_mb": memory_mb(device),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "cuda": torch.version.cuda,
                "python": platform.python_version(),
            },
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "train": None,
        "decode": None,
    }
    if not args.skip_train:
        phase = time.perf_counter()
        saved = {k: v.detach().clone() for k, v in model.duplex_state_dict().items()}
        results["train"] = guarded("train", lambda: bench_train(model, args, device))
        with torch.no_grad():  # decode with the benchmark's duplex weights, not the ones the steps moved
            for name, tensor in model.duplex_state_dict().items():
                tensor.copy_(saved[name])
        del saved
        model.eval()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"[train] done in {time.perf_counter() - phase:.1f} s")
        write(results, args.out)
    if not args.skip_decode:
        phase = time.perf_counter()
        results["decode"] = guarded("decode", lambda: bench_decode(model, args, device, results, args.out))
        log(f"[decode] done in {time.perf_counter() - phase:.1f} s")
    results["meta"]["wall_seconds"] = time.perf_counter() - started
    table = markdown(results)
    print(table, flush=True)
    write(results, args.out)
    log(f"done in {results['meta']['wall_seconds']:.1f} s")
    return results


if __name__ == "__main__":
    main()
