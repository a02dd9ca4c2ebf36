"""How much of a correction the workspace read carries before any training: teacher-forced accuracy of the
tokens after the update with every adapter gate set by hand, against the same backbone given the correction
in-band (the ceiling) and against dropping it (ignore).

    python bench/workspace_ceiling.py [--backbone checkpoints/duplex-tiny-backbone] [--n 56]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval_duplex
from data import build_dataset
from data.collate import IGNORE_INDEX, DuplexCollator, tokenize_row
from modeling_duplex import DuplexForCausalLM


@torch.no_grad()
def inband_accuracy(model: DuplexForCausalLM, tokenizer, rows: list[dict], batch_size: int) -> float:
    """Teacher-forced accuracy of the post-update tokens with the correction spliced into the token stream."""
    collator, hits, total = DuplexCollator(tokenizer.pad_token_id), 0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = collator([tokenize_row(r, tokenizer, "inband") for r in chunk])
        labels = batch.pop("labels")[:, 1:]
        predicted = model.get_base_model()(**batch).logits[:, :-1].argmax(-1)
        for row, (label, guess) in enumerate(zip(labels, predicted, strict=True)):
            duplex = tokenize_row(chunk[row], tokenizer, "duplex")
            after = sum(
                1
                for i, t in enumerate(duplex["labels"][1:])
                if t != IGNORE_INDEX and i >= duplex["update_positions"][0]
            )
            keep = (label != IGNORE_INDEX).nonzero()[:, 0][-after:]
            hits += int((guess[keep] == label[keep]).sum())
            total += len(keep)
    return hits / total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="checkpoints/duplex-tiny-backbone")
    parser.add_argument("--n", type=int, default=56, help="held-out single-correction instances")
    parser.add_argument("--gates", type=float, nargs="+", default=[0.0, 1.0, 3.0], help="raw gate values g")
    args = parser.parse_args(argv)
    model, tokenizer = eval_duplex.load_checkpoint(args.backbone)
    model = DuplexForCausalLM.from_backbone(model.get_base_model(), num_slots=128, encoder_layers=0).eval()
    rows = list(build_dataset("test", args.n, seed=0, mix={"one": 1.0}))
    print("| gate tanh(g) | workspace | ignore |\n|---:|---:|---:|")
    for gate in args.gates:
        with torch.no_grad():
            for adapter in model.adapters.values():
                adapter.gate.fill_(gate)
        tf = eval_duplex.teacher_forced_diagnostics(model, tokenizer, rows)
        rate = {m: tf[m]["post_update_token_accuracy"]["rate"] for m in tf}
        print(f"| {torch.tanh(torch.tensor(gate)):.3f} | {rate['workspace']:.1%} | {rate['ignore']:.1%} |")
    ceiling = inband_accuracy(model, tokenizer, rows, 28)
    print(f"\nin-band (the same backbone, correction in the token stream): {ceiling:.1%}")


if __name__ == "__main__":
    main()
