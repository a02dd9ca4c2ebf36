"""A chat backbone's own answers as training targets.

The families' oracles write one fixed style (`dog, cat, horse`); a pretrained chat model writes its own (`1. Lions\\n
2. Tigers`). Trained on the oracles, the channel learns to write the oracle's words after any correction instead of
reading the correction. Here each row's text is what the frozen backbone itself writes: its answer to the instruction
up to where an update lands, and after a correction its answer to the question the correction makes of the
instruction (`Name 4 fruits.` + `Name animals instead.` -> `Name 4 animals.`), kept where the family's rule accepts
it. The channel then only has to make the backbone take the corrected question as its own.

After a correction the candidates, first accepted wins: the backbone asked the corrected question going on from what it
has written (greedy), then `samples` sampled goings-on; its answer asked afresh (greedy: it starts its answer over) is
tried first, last or never (`afresh`). A row none of them passes is dropped; `followed` records which kind each kept
correction took. After a backchannel the answer goes on unchanged.

Given a trained Duplex model (`channel`), its own answers come first: the correction read through its channel where it
landed, greedy, then `samples` sampled, each held to the family's rule and to a clean join (`data.joins`). Training on
them is a round of self-training (expert iteration): the model learns from what it already gets right, and from its
own samples where its greedy answer goes wrong.

Writing takes hours on a CPU; with a `journal` folder each finished stage (the first answers, then each kind of
candidate for each update) is kept on disk, and a run started again resumes after the last one. Each stage's sampling
is seeded by its name, so a resumed run writes what an uninterrupted one would.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import datasets
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from .collate import encode, update_ats
from .dataset import FEATURES, instance_from_row, instance_to_row
from .joins import answer_join
from .prompts import PromptFormat
from .tasks import Instance, get_family

logger = logging.getLogger(__name__)

OWN_ANSWER_FEATURES = datasets.Features(
    {**FEATURES, "ends_with_eos": datasets.Value("bool"), "followed": datasets.List(datasets.Value("string"))}
)
AFRESH_ORDERS = ("first", "last", "never")  # where the answer asked afresh comes among the candidates
CHANNEL_KINDS = ("channel", "channel sampled")  # candidates a trained Duplex model writes through its channel


class PrefixForcing(LogitsProcessor):
    """Forces each row's first new tokens (its answer up to where an update lands), so that a model writes on its own
    only from there, exactly as it would in generation."""

    def __init__(self, forced: list[list[int]], prompt_width: int):
        self.forced, self.prompt_width = forced, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width
        for b, tokens in enumerate(self.forced):
            if step < len(tokens):
                scores[b] = float("-inf")
                scores[b, tokens[step]] = 0.0
        return scores


@dataclass(eq=False)  # rows are told apart by identity
class _Row:
    """One row being written: its instance, where its updates land (tokens) and the tokens written so far."""

    inst: Instance
    ats: list[int]
    original: list[int] = field(default_factory=list)  # the backbone's answer with no update
    pieces: list[list[int]] = field(default_factory=list)  # the answer's tokens between landings, so far
    going_on: list[int] = field(default_factory=list)  # what the backbone writes next if nothing lands
    ends: bool = False  # `going_on` ends the answer (EOS) within the budget
    corrections: int = 0
    followed: list[str] = field(default_factory=list)  # the candidate kind each correction took

    @property
    def written(self) -> list[int]:
        return [t for piece in self.pieces for t in piece]


def own_answer_rows(
    rows: datasets.Dataset,
    model: torch.nn.Module,
    tokenizer,
    prompt_format: PromptFormat,
    max_new_tokens: int = 48,
    samples: int = 4,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    afresh: Literal["first", "last", "never"] = "first",
    channel: torch.nn.Module | None = None,
    journal: str | Path | None = None,
) -> datasets.Dataset:
    """`rows` (the families' instances, e.g. from `build_dataset`) rewritten in `model`'s own words, at most
    `max_new_tokens` answer tokens each (the evaluation's budget); `ends_with_eos` tells whether the answer ended
    within it. Updates land after as many answer tokens as the instance's oracle writes before them. The answer asked
    afresh starts over from its first line mid-text: `afresh="last"` takes it only where no going-on passes,
    `"never"` not at all (every kept correction then goes on from what was written). `channel`: a trained Duplex model
    on the same backbone, whose own answers through its channel are tried before the backbone's. `journal`: a folder
    keeping each finished stage, from which an interrupted run resumes."""
    if afresh not in AFRESH_ORDERS:
        raise ValueError(f"afresh must be one of {AFRESH_ORDERS}, got {afresh!r}")
    stages = _Journal(journal, seed)
    writer = _Writer(model, tokenizer, prompt_format, max_new_tokens, batch_size, progress, channel)
    todo = [_Row(inst, update_ats(tokenizer, row["segments"])) for row in rows for inst in [instance_from_row(row)]]
    questions = [(r.inst.family, r.inst.instruction) for r in todo]
    for r, (ids, ends) in zip(todo, stages.run("answers", functools.partial(writer.answers, questions)), strict=True):
        r.original, r.going_on, r.ends = ids, ids, ends
    logger.info("own answers: %d questions answered", len(set(questions)))
    accepted = dict.fromkeys(["going on", "afresh", "sampled", *CHANNEL_KINDS], 0)
    for j in range(max((len(r.ats) for r in todo), default=0)):
        landing = [r for r in todo if j < len(r.ats)]
        dropped = {r for r in landing if not r.going_on}  # the answer ended before the update arrived
        for r in landing:
            if r not in dropped:
                _land(r, j)
        corrected = [r for r in landing if r not in dropped and r.inst.updates[j].kind == "correction"]
        for r in corrected:
            r.corrections += 1
        dropped |= {r for r in corrected if len(r.written) >= max_new_tokens}  # no budget left to follow it
        corrected = [r for r in corrected if r not in dropped]
        kinds = {
            "first": ["going on", "afresh"] + ["sampled"] * samples,
            "last": ["going on"] + ["sampled"] * samples + ["afresh"],
            "never": ["going on"] + ["sampled"] * samples,
        }[afresh]
        if channel is not None:
            kinds = ["channel"] + ["channel sampled"] * samples + kinds
        for index, kind in enumerate(kinds):
            left, stage = [], f"update-{j + 1}-{index:02d}-{kind.replace(' ', '-')}"
            found = stages.run(stage, functools.partial(writer.candidates, kind, corrected))
            for r, (ids, ends) in zip(corrected, found, strict=True):
                if _accept(writer, r, j, ids, join=kind in CHANNEL_KINDS):
                    r.going_on, r.ends = ids, ends
                    r.followed.append(kind)
                    accepted[kind] += 1
                else:
                    left.append(r)
            logger.info("update %d, %s: %d corrections followed, %d left", j + 1, kind, accepted[kind], len(left))
            corrected = left
        dropped |= set(corrected)  # no candidate passed the family's rule
        todo = [r for r in todo if r not in dropped]
    out = [_finished(r, tokenizer) for r in todo]
    logger.info("own answers: %d of %d rows kept; corrections accepted by kind: %s", len(out), len(rows), accepted)
    columns = {name: [row[name] for row in out] for name in OWN_ANSWER_FEATURES}  # (from_list needs a first row)
    return datasets.Dataset.from_dict(columns, features=OWN_ANSWER_FEATURES)


class _Journal:
    """The writing's finished stages, one JSON file each in `folder` (none: nothing kept); every stage runs under a
    seed of its own name, so that its samples do not depend on the stages before it having run in this process."""

    def __init__(self, folder: str | Path | None, seed: int):
        self.folder, self.seed = (Path(folder) if folder is not None else None), seed
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            if done := len(list(self.folder.glob("*.json"))):
                logger.info("own answers: resuming after %d finished stages in %s", done, self.folder)

    def run(self, name: str, write: Callable[[], list[tuple[list[int], bool]]]) -> list[tuple[list[int], bool]]:
        """The stage's answers from the journal, or written now (and kept)."""
        path = None if self.folder is None else self.folder / f"{name}.json"
        if path is not None and path.exists():
            return [(ids, ends) for ids, ends in json.loads(path.read_text())]
        torch.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        answers = write()
        if path is not None:
            partial = path.with_suffix(".partial")
            partial.write_text(json.dumps(answers))
            partial.replace(path)  # a stage is in the journal whole or not at all
        return answers


def _land(r: _Row, j: int) -> None:
    """Write the answer up to update j's landing point (within what is written next; an answer shorter than the
    oracle's lands its update before its last token)."""
    written = len(r.written)
    at = min(max(r.ats[j], written), written + len(r.going_on) - 1)
    r.pieces.append(r.going_on[: at - written])
    r.going_on = r.going_on[at - written :]


def _accept(writer: _Writer, r: _Row, j: int, candidate: list[int], join: bool = False) -> bool:
    """Whether the answer written so far plus `candidate` is right by the family's rule for the updates up to j (and,
    with `join`, goes on cleanly from the text in progress wherever an update landed)."""
    inst = replace(
        r.inst, updates=r.inst.updates[: j + 1], meta=dict(r.inst.meta, values=r.inst.meta["values"][: r.corrections])
    )
    text, landed = writer.text([*r.pieces, candidate])
    if not get_family(inst.family).score(inst, text, landed)["correct"]:
        return False
    if not join:
        return True
    return answer_join(inst, text, landed, reference=writer.tokenizer.decode(r.original)) == "clean"


def _finished(r: _Row, tokenizer) -> dict:
    """The dataset row of a written answer: the instance's row with the backbone's text between landings."""
    segments = [tokenizer.decode(piece) for piece in [*r.pieces, r.going_on]]
    return instance_to_row(r.inst) | {
        "original_response": tokenizer.decode(r.original),
        "response": "".join(segments),
        "segments": segments,
        "update_change_offsets": [-1] * len(r.inst.updates),  # not known for free text
        "ends_with_eos": r.ends,
        "followed": r.followed,
    }


class _Writer:
    """Batched greedy (or sampled) answers of the backbone (or of the channel), in the prompt format; answers afresh
    are cached."""

    def __init__(
        self, model, tokenizer, prompt_format: PromptFormat, max_new_tokens: int, batch_size: int, progress, channel
    ):
        self.model, self.tokenizer, self.prompt_format = model, tokenizer, prompt_format
        self.max_new_tokens, self.batch_size, self.progress = max_new_tokens, batch_size, progress
        self.channel = channel
        self._afresh: dict[tuple[str, str], tuple[list[int], bool]] = {}

    def text(self, pieces: list[list[int]]) -> tuple[str, list[int]]:
        """The answer's text and the characters where each piece after the first begins (the landing points)."""
        landed, ids = [], []
        for piece in pieces[:-1]:
            ids += piece
            landed.append(len(self.tokenizer.decode(ids)))
        return self.tokenizer.decode(ids + pieces[-1]), landed

    def answers(self, questions: list[tuple[str, str]]) -> list[tuple[list[int], bool]]:
        """Greedy answers to (family, instruction) questions, asked afresh."""
        missing = list(dict.fromkeys(q for q in questions if q not in self._afresh))
        prompts = [encode(self.tokenizer, self.prompt_format.prompt(*q)) for q in missing]
        answers = self._generate(prompts, [self.max_new_tokens] * len(prompts), False)
        self._afresh.update(zip(missing, answers, strict=True))
        return [self._afresh[q] for q in questions]

    def candidates(self, kind: str, rows: list[_Row]) -> list[tuple[list[int], bool]]:
        """Each row's answer after its latest correction (at most its budget's tokens): the backbone asked the
        corrected question "going on" from what it has written, "afresh", or going on "sampled"; or the channel's
        answer to the question as it was asked, every update so far read through its channel where it landed
        ("channel", "channel sampled")."""
        budgets = [self.max_new_tokens - len(r.written) for r in rows]
        if kind in CHANNEL_KINDS:
            prompts = [
                encode(self.tokenizer, self.prompt_format.prompt(r.inst.family, r.inst.instruction)) for r in rows
            ]
            updates = [_landed_updates(r) for r in rows]
            forced = [r.written for r in rows]
            return self._generate(prompts, budgets, kind == "channel sampled", forced, updates)
        questions = [(r.inst.family, get_family(r.inst.family).instruction_after(r.inst, r.corrections)) for r in rows]
        if kind == "afresh":
            answers = self.answers(questions)
            return [(ids[:b], ends and len(ids) < b) for (ids, ends), b in zip(answers, budgets, strict=True)]
        prompts = [
            encode(self.tokenizer, self.prompt_format.prompt(*q)) + r.written
            for q, r in zip(questions, rows, strict=True)
        ]
        return self._generate(prompts, budgets, sample=kind == "sampled")

    @torch.no_grad()
    def _generate(
        self,
        prompts: list[list[int]],
        budgets: list[int],
        sample: bool,
        forced: list[list[int]] | None = None,
        updates: list[list[tuple[int, str]]] | None = None,
    ) -> list[tuple[list[int], bool]]:
        """Each prompt's next tokens (at most its budget), left-padded batches; and whether EOS ended them. With
        `updates`, the channel writes instead of the backbone, its rows' answers forced up to their latest landing
        (`forced`) and their `updates` read where they land; what comes back is what it writes after the forced
        tokens."""
        model = self.model if updates is None else self.channel
        forced = forced or [[] for _ in prompts]
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        out: list[tuple[list[int], bool] | None] = [None] * len(prompts)
        # similar lengths: little padding; the same landing: one step of the batch reads the updates (each landing
        # step runs the correction's tokens through the whole batch)
        order = sorted(range(len(prompts)), key=lambda i: (len(forced[i]), len(prompts[i])))
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="own answers", unit="batch", leave=False, disable=not self.progress):
            batch = order[start : start + self.batch_size]
            width = max(len(prompts[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for b, i in enumerate(batch):
                input_ids[b, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                attention_mask[b, width - len(prompts[i]) :] = 1
            channel = {}
            if updates is not None:
                forcing = PrefixForcing([forced[i] for i in batch], width)
                channel = {
                    "updates": [updates[i] for i in batch],
                    "tokenizer": self.tokenizer,
                    "logits_processor": LogitsProcessorList([forcing]),
                }
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max(1, max(len(forced[i]) + budgets[i] for i in batch)),
                do_sample=sample,
                temperature=0.8 if sample else None,
                top_p=0.95 if sample else None,
                top_k=None,
                eos_token_id=eos,
                pad_token_id=pad,
                **channel,
            )[:, width:].tolist()
            for b, i in enumerate(batch):
                ids = generated[b][len(forced[i]) : len(forced[i]) + budgets[i]]
                ends = eos in ids
                out[i] = (ids[: ids.index(eos)] if ends else ids, ends)
        return out


def _landed_updates(r: _Row) -> list[tuple[int, str]]:
    """Every update of the row that has landed so far, with the answer tokens written before it."""
    ats = itertools.accumulate(len(piece) for piece in r.pieces)
    return [(at, update.text) for at, update in zip(ats, r.inst.updates[: len(r.pieces)], strict=False)]
