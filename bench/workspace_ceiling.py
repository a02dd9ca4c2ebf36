"""How much of a correction the workspace read carries before any training, and where it loses it.

Teacher-forced accuracy after a single correction, on held-out instances, with every adapter gate set by hand:
per post-update token, on the decision token (where the correction first changes the answer) and per row (every
post-update token right: what greedy exact match needs). Compared on the same rows with:

- `ignore`: the correction dropped;
- `in-band`: the same frozen backbone given the correction in the token stream (the ceiling);
- `in-band geometry`: a read the model does not make, measured to locate the gap: the correction's keys and values
  computed by the backbone *in context* (after the answer so far, at the positions in-band gives them) and every
  later token moved back by the correction's length, so that, gates open, the read equals in-band attention.

    python bench/workspace_ceiling.py [--backbone checkpoints/duplex-tiny-backbone] [--n-per-family 10] \
        [--checkpoint checkpoints/duplex-tiny]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval_duplex
from data.collate import IGNORE_INDEX, DuplexCollator, encode, tokenize_row
from modeling_duplex import DuplexForCausalLM

COLUMNS = ("workspace", "ignore", "in-band geometry", "in-band")


def in_context_read(model: DuplexForCausalLM, input_ids: list[int], at_index: int, correction: list[int]):
    """Per-layer keys/values of the correction tokens run by the backbone after input_ids[: at_index + 1] (as
    in-band would), and the position ids that move every later token back by the correction's length."""
    backbone = model.model
    cache = DynamicCache(config=backbone.config)
    backbone(input_ids=torch.tensor([input_ids[: at_index + 1] + correction]), past_key_values=cache, use_cache=True)
    workspace_kv = [
        (cache.layers[int(i)].keys[:, :, at_index + 1 :], cache.layers[int(i)].values[:, :, at_index + 1 :])
        for i in model.adapters
    ]
    positions = torch.arange(len(input_ids))[None]
    return workspace_kv, torch.where(positions > at_index, positions + len(correction), positions)


@torch.no_grad()
def row_predictions(model: DuplexForCausalLM, tokenizer, row: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Greedy next-token predictions on the oracle's tokens for every column, and the row's label masks."""
    feature = tokenize_row(row, tokenizer, "duplex", brings_prompt=model.workspace.brings_prompt)
    batch = DuplexCollator(tokenizer.pad_token_id, decisions=True)([feature])
    labels, decisions = batch.pop("labels")[0, 1:], batch.pop("decision_mask")[0, 1:]
    at_index = int(batch["update_positions"][0, 0])
    after = (torch.arange(labels.shape[0]) >= at_index) & (labels != IGNORE_INDEX)
    plain = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    predicted = {
        "workspace": model(**batch).logits[0, :-1].argmax(-1),
        "ignore": model(**plain).logits[0, :-1].argmax(-1),
    }
    correction = encode(tokenizer, model.config.inband_template.replace("{text}", row["update_texts"][0]))
    workspace_kv, positions = in_context_read(model, feature["input_ids"], at_index, correction)
    readable = torch.zeros(1, 1, len(feature["input_ids"]), len(correction), dtype=torch.bool)
    readable[:, :, at_index:] = True
    geometry = model(**plain, position_ids=positions, workspace_kv=workspace_kv, workspace_mask=readable)
    predicted["in-band geometry"] = geometry.logits[0, :-1].argmax(-1)
    inband = DuplexCollator(tokenizer.pad_token_id)([tokenize_row(row, tokenizer, "inband")])
    inband_labels = inband.pop("labels")[0, 1:]
    keep = (inband_labels != IGNORE_INDEX).nonzero()[:, 0][-int(after.sum()) :]  # the same post-update tokens
    inband_predicted = torch.full_like(labels, -1)
    inband_predicted[after] = model.get_base_model()(**inband).logits[0, :-1].argmax(-1)[keep]
    predicted["in-band"] = inband_predicted
    return predicted, {"labels": labels, "after": after, "decisions": decisions & after}


def measure(model: DuplexForCausalLM, tokenizer, rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per column: post-update token accuracy, decision token accuracy and rows with every post-update token right."""
    counts = {c: [0, 0, 0, 0, 0] for c in COLUMNS}  # tokens ok, tokens, decisions ok, decisions, rows ok
    for row in rows:
        predicted, masks = row_predictions(model, tokenizer, row)
        for column, guess in predicted.items():
            correct, c = guess == masks["labels"], counts[column]
            c[0] += int(correct[masks["after"]].sum())
            c[1] += int(masks["after"].sum())
            c[2] += int(correct[masks["decisions"]].sum())
            c[3] += int(masks["decisions"].sum())
            c[4] += int(correct[masks["after"]].all())
    return {
        column: {"token": c[0] / c[1], "decision": c[2] / max(c[3], 1), "row": c[4] / len(rows)}
        for column, c in counts.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="checkpoints/duplex-tiny-backbone")
    parser.add_argument("--n-per-family", type=int, default=10, help="held-out single-correction instances")
    parser.add_argument("--gates", type=float, nargs="+", default=[0.0, 6.0], help="raw gate values g")
    parser.add_argument("--workspace-update", default="fifo", help="how the untrained read writes (fifo, in_context)")
    parser.add_argument("--checkpoint", help="also a trained Duplex checkpoint on the same backbone (its own gates)")
    args = parser.parse_args(argv)
    model, tokenizer = eval_duplex.load_checkpoint(args.backbone)
    model = DuplexForCausalLM.from_backbone(
        model.get_base_model(), num_slots=128, encoder_layers=0, workspace_update=args.workspace_update
    ).eval()
    rows = eval_duplex.build_eval_set(n_per_family=args.n_per_family, sweep_per_family=0, kinds=["one"])[0]["one"]
    print(f"n = {len(rows)} held-out single-correction rows; per token / decision token / rows all right\n")
    print("| gate tanh(g) | " + " | ".join(COLUMNS) + " |\n|---:|" + "---|" * len(COLUMNS))
    for gate in args.gates:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".gate"):  # every adapter's, and the in-context readout's
                    param.fill_(gate)
        figures = measure(model, tokenizer, rows)
        cells = [f"{f['token']:.1%} / {f['decision']:.1%} / {f['row']:.1%}" for f in figures.values()]
        print(f"| {torch.tanh(torch.tensor(gate)):.3f} | " + " | ".join(cells) + " |")
    if args.checkpoint:
        trained, _ = eval_duplex.load_checkpoint(args.checkpoint)
        f = measure(trained.eval(), tokenizer, rows)["workspace"]  # the other columns are the backbone's own
        cells = [f"{f['token']:.1%} / {f['decision']:.1%} / {f['row']:.1%}"] + ["as above"] * (len(COLUMNS) - 1)
        print(f"| trained ({args.checkpoint}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
