"""Phase 0's training throughput on this machine: precision, `torch.compile`, padding and batch size, side by side.

    python bench/bench_pretrain.py                       # every setting, 12 timed steps each, on the tiny backbone
    python bench/bench_pretrain.py --steps 20 --batch-sizes 32 64

Each setting trains a fresh copy of the same tiny Qwen3 (same init, same data order) for `--warmup` untimed and
`--steps` timed optimizer steps on phase 0's own corpus (plain, turn-based and in-band rows) and prints response
tokens per second, the share of padding in the batches and the loss after the last step, so that a faster setting
can be checked to learn as well. Orders: "random" (what the Trainer's default sampler does) and "grouped"
(`train_sampling_strategy="group_by_length"`: batches of similar length, less padding).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import Qwen3ForCausalLM

from backbone_shapes import backbone_config
from data import build_byte_tokenizer, build_dataset
from data.collate import IGNORE_INDEX, DuplexCollator, tokenize_row


def corpus(tokenizer, n: int) -> list[dict]:
    """Phase 0's three formats over the same kind of rows, shuffled."""
    rows = build_dataset("train", n, seed=0)
    out = [tokenize_row(r, tokenizer, fmt) for fmt in ("plain", "inband") for r in rows]
    out += [tokenize_row(r, tokenizer, "restart") for r in rows if r["update_kinds"].count("correction") == 1]
    random.Random(0).shuffle(out)
    return out


def batches(features: list[dict], batch_size: int, order: str, count: int) -> list[list[dict]]:
    """`count` batches in random order, or grouped by length (megabatches of 50 batches sorted by length, as
    transformers' LengthGroupedSampler does)."""
    needed = features[: batch_size * count]
    if order == "grouped":
        mega = 50 * batch_size
        needed = [
            f
            for i in range(0, len(features), mega)
            for f in sorted(features[i : i + mega], key=lambda f: -len(f["input_ids"]))
        ]
        groups = [needed[i : i + batch_size] for i in range(0, len(needed) - batch_size + 1, batch_size)]
        random.Random(1).shuffle(groups)
        return groups[:count]
    return [needed[i : i + batch_size] for i in range(0, len(needed), batch_size)]


def run(setting: dict, tokenizer, features: list[dict], args) -> dict:
    torch.manual_seed(0)
    config = backbone_config(
        "tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model = Qwen3ForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_fn = model
    if setting["compile"]:
        step_fn = torch.compile(model, dynamic=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if setting["bf16"] else nullcontext()
    collate = DuplexCollator(tokenizer.pad_token_id)
    todo = batches(features, setting["batch_size"], setting["order"], args.warmup + args.steps)
    tokens = 0
    start = time.perf_counter()
    for i, batch in enumerate(todo):
        if i == args.warmup:
            start = time.perf_counter()
        inputs = collate(batch)
        with autocast:
            loss = step_fn(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            tokens += int((inputs["labels"] != IGNORE_INDEX).sum())
    seconds = time.perf_counter() - start
    timed = todo[args.warmup :]
    cells = sum(len(b) * max(len(f["input_ids"]) for f in b) for b in timed)
    real = sum(len(f["input_ids"]) for b in timed for f in b)
    return {
        **setting,
        "seconds_per_step": seconds / args.steps,
        "tokens_per_second": tokens / seconds,
        "padding": 1 - real / cells,
        "loss": loss.item(),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = build_byte_tokenizer()
    features = corpus(tokenizer, 4000)
    settings = [
        {"bf16": bf16, "compile": compiled, "order": "random", "batch_size": 32}
        for compiled in (False, True)
        for bf16 in (False, True)
    ]
    settings += [
        {"bf16": bf16, "compile": False, "order": "grouped", "batch_size": b}
        for b in args.batch_sizes
        for bf16 in (False, True)
    ]
    results = []
    print(f"threads {torch.get_num_threads()}, {args.steps} timed steps per setting")
    print("| precision | compile | order | batch | s/step | response tokens/s | padding | loss after |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for setting in settings:
        r = run(setting, tokenizer, features, args)
        results.append(r)
        print(
            f"| {'bf16 autocast' if r['bf16'] else 'fp32'} | {'yes' if r['compile'] else 'no'} | {r['order']} |"
            f" {r['batch_size']} | {r['seconds_per_step']:.3f} | {r['tokens_per_second']:,.0f} |"
            f" {100 * r['padding']:.1f}% | {r['loss']:.3f} |",
            flush=True,
        )
    base = results[0]["tokens_per_second"]
    for r in results[1:]:
        print(f"{r['bf16'], r['compile'], r['order'], r['batch_size']}: {r['tokens_per_second'] / base:.2f}x fp32")
    return results


if __name__ == "__main__":
    main()
