"""Rows -> token features -> padded batches. The one place that turns a correction's word boundary into
the token count `at` and the sequence position the model uses, for training and evaluation alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from generation_duplex import pack_updates, update_position

from .dataset import instance_from_row
from .prompts import PromptFormat
from .tasks import get_family

FORMATS = ("duplex", "plain", "restart", "inband", "teacher")
IGNORE_INDEX = -100


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def update_ats(tokenizer, segments: list[str]) -> list[int]:
    """New-token count before each update lands: the tokens of the response segments in front of it."""
    ats, total = [], 0
    for segment in segments[:-1]:
        total += len(encode(tokenizer, segment))
        ats.append(total)
    return ats


def restart_response(row: dict) -> str:
    """The oracle answer when the (single) correction is given before the first word."""
    inst = instance_from_row(row)
    return get_family(inst.family).with_update_at(inst, 0).response


def tokenize_row(
    row: dict,
    tokenizer,
    fmt: str = "duplex",
    prompt_format: PromptFormat | None = None,
    teacher: bool = False,
) -> dict:
    """One dataset row -> input_ids, labels (response tokens only) and, for "duplex", the updates with the
    positions `forward` expects. `prompt_format` renders the text (default: plain text).

    Formats: "plain" (the answer without updates), "restart" (the corrections as a new turn, the answer from the
    first word), "inband" (every update spliced into the answer as text), "teacher" (corrections spliced in,
    distractors dropped: what the answer should follow), "duplex" (updates kept apart, for the workspace; with
    `teacher=True` also the row's "teacher" rendering as teacher_input_ids / teacher_labels, which label the same
    response tokens in the same order)."""
    if fmt not in FORMATS:
        raise ValueError(f"`fmt` must be one of {FORMATS}, got {fmt!r}")
    prompt_format = prompt_format or PromptFormat()
    inband_template = prompt_format.inband_template
    eos = [tokenizer.eos_token_id] if row.get("ends_with_eos", True) else []  # an answer cut at its budget: no EOS
    corrections = [t for t, kind in zip(row["update_texts"], row["update_kinds"], strict=True) if kind == "correction"]
    if fmt == "restart":
        prompt = encode(tokenizer, prompt_format.restart_prompt(row["family"], row["instruction"], corrections))
        pieces = [encode(tokenizer, restart_response(row) if corrections else row["response"]) + eos]
    else:
        prompt = encode(tokenizer, prompt_format.prompt(row["family"], row["instruction"]))
        answer = [row["original_response"]] if fmt == "plain" else row["segments"]
        pieces = [encode(tokenizer, s) for s in answer]
        pieces[-1] = pieces[-1] + eos
    input_ids, labels = list(prompt), [IGNORE_INDEX] * len(prompt)
    positions, update_ids, piece_starts = [], [], []
    for u, piece in enumerate(pieces):
        spliced = u > 0 and (fmt == "inband" or (fmt == "teacher" and row["update_kinds"][u - 1] == "correction"))
        if spliced:  # the correction rides in the token stream, unlabelled
            inserted = encode(tokenizer, inband_template.replace("{text}", row["update_texts"][u - 1]))
            input_ids += inserted
            labels += [IGNORE_INDEX] * len(inserted)
        if u > 0 and fmt == "duplex":
            positions.append(update_position(len(prompt), len(input_ids) - len(prompt)))
            written = encode(tokenizer, inband_template.replace("{text}", row["update_texts"][u - 1]))
            update_ids.append(written)  # what the update encoder reads: the correction as in-band text writes it
        piece_starts.append(len(input_ids))
        input_ids += piece
        labels += piece
    features = {"input_ids": input_ids, "labels": labels}
    if fmt == "duplex":
        features |= {"update_positions": positions, "update_token_ids": update_ids}
        features["update_is_correction"] = [kind == "correction" for kind in row["update_kinds"]]
        features["decision_positions"] = decision_positions(row, tokenizer, pieces, piece_starts)
        if teacher:
            taught = tokenize_row(row, tokenizer, "teacher", prompt_format)
            features |= {"teacher_input_ids": taught["input_ids"], "teacher_labels": taught["labels"]}
    return features


def decision_positions(row: dict, tokenizer, pieces: list[list[int]], piece_starts: list[int]) -> list[int]:
    """Sequence indices of the tokens where the row's corrections first change the answer (its
    `update_change_offsets`, characters of the response): the decisions a landed correction turns on. `pieces` are
    the response segments' token ids (the last one ends with EOS), `piece_starts` where each begins in input_ids."""
    out = []
    for offset in row.get("update_change_offsets") or []:
        if offset < 0:
            continue
        start = 0  # character offset of the segment in the response
        for segment, piece, first in zip(row["segments"], pieces, piece_starts, strict=True):
            if offset < start + len(segment) or segment is row["segments"][-1]:
                out.append(first + token_at(tokenizer, piece, offset - start))
                break
            start += len(segment)
    return out


def token_at(tokenizer, ids: list[int], char: int) -> int:
    """Index of the token of `ids` that holds character `char` of their text (the last token, EOS, past the end)."""
    for t in range(len(ids)):
        if len(tokenizer.decode(ids[: t + 1], clean_up_tokenization_spaces=False)) > char:
            return t
    return len(ids) - 1


@dataclass
class DuplexCollator:
    """Right-pads token features; packs the updates (if any) into the tensors `DuplexForCausalLM.forward` takes;
    a teacher rendering (`tokenize_row(..., teacher=True)`) becomes teacher_input_ids / _attention_mask / _labels;
    with `decisions=True`, the rows' decision tokens become a (B, T) bool `decision_mask` over the labels (for
    diagnostics, which must pop it before calling the model)."""

    pad_token_id: int
    decisions: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self._pad([f["input_ids"] for f in features], [f["labels"] for f in features])
        if "teacher_input_ids" in features[0]:
            taught = self._pad([f["teacher_input_ids"] for f in features], [f["teacher_labels"] for f in features])
            batch |= {f"teacher_{key}": value for key, value in taught.items()}
        if "update_positions" in features[0]:
            updates = [list(zip(f["update_positions"], f["update_token_ids"], strict=True)) for f in features]
            batch |= pack_updates(updates, pad_token_id=self.pad_token_id)
            if "update_is_correction" in features[0]:  # the known kinds: teacher-forced decisions, and their loss
                kinds = torch.zeros_like(batch["update_positions"], dtype=torch.bool)  # (B, U)
                for b, f in enumerate(features):
                    known = f["update_is_correction"]
                    kinds[b, : len(known)] = torch.tensor(known, dtype=torch.bool)
                batch["update_is_correction"] = kinds
        if self.decisions:
            decisions = torch.zeros_like(batch["labels"], dtype=torch.bool)  # (B, T)
            for b, f in enumerate(features):
                decisions[b, f["decision_positions"]] = True
            batch["decision_mask"] = decisions
        return batch

    def _pad(self, input_ids: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
        length = max(map(len, input_ids))
        batch = {
            "input_ids": torch.full((len(input_ids), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(input_ids), length), dtype=torch.long),
            "labels": torch.full((len(input_ids), length), IGNORE_INDEX, dtype=torch.long),
        }
        for b, (ids, row_labels) in enumerate(zip(input_ids, labels, strict=True)):
            batch["input_ids"][b, : len(ids)] = torch.tensor(ids)
            batch["attention_mask"][b, : len(ids)] = 1
            batch["labels"][b, : len(ids)] = torch.tensor(row_labels)
        return batch
