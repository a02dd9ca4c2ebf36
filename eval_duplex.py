"""Evaluate a Duplex checkpoint on held-out task instances: revision accuracy, contradictions, distractor stability,
retention, multi-update accuracy, tokens-to-revision and a position sweep, for every mode on identical instances.

Library use (train_duplex.py):  results = evaluate(model, tokenizer); write_report(results, out_dir)
CLI:  python eval_duplex.py --checkpoint DIR [--tdm-checkpoint DIR] [--out DIR] [--n-per-family N] [--seeds 0 1 2]

Modes, all on identical instances:
  workspace  the duplex model, corrections written into the workspace mid-stream
  ignore     the same model, corrections dropped (ablation)
  inband     the same model, the correction's tokens spliced into the context at `at`; its workspace stays empty, so
             this is the frozen backbone given the correction in-band
  restart    the backbone alone (`get_base_model()`), re-prompted with `PromptFormat.restart_prompt`;
             its whole response is scored against the oracle for an update at word 0 (single-update instances only)
  tdm        a second duplex checkpoint whose backbone was fully fine-tuned on in-band corrections, run in-band
A "backbone" column (the backbone alone, no updates) is the retention reference.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from data import (
    CHAT_FAMILIES,
    FAMILIES,
    LANDINGS,
    MIX_KINDS,
    Instance,
    build_dataset,
    get_family,
    instance_from_row,
    instance_to_row,
    landing_kind,
    word_boundary,
)
from data.collate import IGNORE_INDEX, DuplexCollator, encode, tokenize_row, update_ats
from data.joins import answer_join
from data.prompts import PromptFormat

MODES = ("workspace", "ignore", "inband", "restart", "tdm")
DEFAULT_MODES = ("workspace", "ignore", "inband", "restart")
BACKBONE = "backbone"  # pseudo-mode: the backbone alone without updates (retention reference)
KINDS = (  # keys of data.MIX_KINDS
    "none",
    "one",
    "one_after_space",
    "one_in_word",
    "distractor",
    "held_out_distractor",
    "two",
    "three",
)
DISTRACTOR_KINDS = ("distractor", "held_out_distractor")
# mode -> (which model generates, `update_mode` passed to its generate; None: a plain causal LM, no updates)
RUNNERS: dict[str, tuple[str, str | None]] = {
    "workspace": ("duplex", "workspace"),
    "ignore": ("duplex", "ignore"),
    "inband": ("duplex", "inband"),
    "restart": ("backbone", None),
    "tdm": ("tdm", "inband"),
    BACKBONE: ("backbone", None),
}
# metric -> (instance kinds it is measured on, per-instance field); all are proportions, over the instances that
# carry the field (the update decision: only modes that decide, i.e. workspace)
PROPORTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "revision_accuracy": (("one",), "correct"),
    "revision_accuracy_after_space": (("one_after_space",), "correct"),
    "revision_accuracy_in_word": (("one_in_word",), "correct"),
    "contradiction_rate": (("one",), "contradiction"),
    "distractor_stability": (("distractor",), "stable"),
    "held_out_distractor_stability": (("held_out_distractor",), "stable"),
    "decision_accuracy": (
        ("one", "one_after_space", "one_in_word", "two", "distractor", "held_out_distractor"),
        "decided",
    ),
    "retention": (("none",), "exact"),
    "two_update_accuracy": (("two",), "correct"),
    "three_update_accuracy": (("three",), "correct"),
    "clean_join": (("one", "one_after_space", "one_in_word", "two", "three"), "clean_join"),
}
JOIN_KINDS = PROPORTIONS["clean_join"][0]
METRIC_LABELS = {
    "revision_accuracy": "revision accuracy",
    "revision_accuracy_after_space": "revision accuracy, landing after the space",
    "revision_accuracy_in_word": "revision accuracy, landing inside a word",
    "contradiction_rate": "contradiction rate",
    "distractor_stability": "distractor stability",
    "held_out_distractor_stability": "distractor stability, held-out backchannels",
    "decision_accuracy": "update decision accuracy (correction / backchannel)",
    "retention": "retention (no updates)",
    "two_update_accuracy": "two-update accuracy",
    "three_update_accuracy": "three-update accuracy",
    "clean_join": "clean join (corrected answers, mid-stream)",
    "tokens_to_revision": "tokens-to-revision (mean)",
}
# The toy prototype's figures (the reference column of the targets), shown beside ours.
REFERENCE = {
    "revision_accuracy": {"workspace": 0.55, "ignore": 0.044},
    "contradiction_rate": {"workspace": 0.036, "ignore": 0.402},
}
SWEEP_BINS = 5
Z95 = 1.959963984540054


class Job(NamedTuple):
    """One distinct generation: which model, which prompt, which updates, in which `update_mode` (None: plain)."""

    model_key: str
    prompt: str
    updates: tuple[tuple[int, str], ...]
    update_mode: str | None


# ----------------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------------


def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a proportion (95% by default); None when there is nothing to measure."""
    if total <= 0:
        return None
    p = successes / total
    denom = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)  # the exact bounds at 0/n and n/n (no rounding)
    hi = 1.0 if successes == total else min(1.0, center + half)
    return lo, hi


def proportion(flags: Sequence[bool]) -> dict[str, Any]:
    """k, n, rate and Wilson 95% CI of a list of booleans (rate/ci None when empty)."""
    k, n = sum(bool(f) for f in flags), len(flags)
    ci = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci": list(ci) if ci else None}


def mean_stat(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, median and a normal-approximation 95% CI (mean +- 1.96 s/sqrt(n)) of a list of numbers."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "median": None, "ci": None}
    mean = statistics.fmean(values)
    half = Z95 * statistics.stdev(values) / math.sqrt(n) if n > 1 else 0.0
    return {"n": n, "mean": mean, "median": statistics.median(values), "ci": [mean - half, mean + half]}


# ----------------------------------------------------------------------------------------------------------------------
# Instances
# ----------------------------------------------------------------------------------------------------------------------


def build_eval_set(
    seeds: Iterable[int] = (0,),
    n_per_family: int = 20,
    sweep_per_family: int = 4,
    families: Sequence[str] | None = None,
    split: str = "test",
    kinds: Sequence[str] = KINDS,
) -> dict[int, dict[str, list[dict]]]:
    """Held-out rows per seed and kind (`kinds` plus "sweep"); a pure function of its arguments, so every mode,
    every run and the oracle test see the same instances. "sweep" rows move a single correction to every point of
    the answer where it can land (every token of a byte-level tokenizer).
    `split`: "test" (held-out values of the training pools) or "outside" (values outside every pool)."""
    names = list(families or FAMILIES)
    out: dict[int, dict[str, list[dict]]] = {}
    for seed in seeds:
        rows = {
            kind: list(build_dataset(split, n_per_family * len(names), seed, families=names, mix={kind: 1.0}))
            for kind in kinds
        }
        swept = sweep_per_family * len(names)  # build_dataset cannot build an empty dataset
        base = build_dataset(split, swept, seed, families=names, mix={"one": 1.0}) if swept else []
        rows["sweep"] = [
            instance_to_row(moved) for row in base for moved in get_family(row["family"]).sweep(instance_from_row(row))
        ]
        out[int(seed)] = rows
    return out


def possible_kinds(kinds: Sequence[str], families: Sequence[str]) -> tuple[list[str], list[str]]:
    """`kinds` split into those some family in `families` can have and those none can (a kind that lands inside a
    word, for families whose answers have no such point): the impossible ones would build no instances at all."""
    landings = {landing for name in families for landing in get_family(name).landings}
    possible = [kind for kind in kinds if MIX_KINDS[kind][2] in (None, *landings)]
    return possible, [kind for kind in kinds if kind not in possible]


def relative_position(row: dict) -> float:
    """Where the first update lands, as a fraction of the pre-update response's words (0 = before the first)."""
    return row["update_word_indices"][0] / len(row["original_response"].split(" "))


def fingerprint(eval_set: dict[int, dict[str, list[dict]]]) -> str:
    """Short hash of the evaluated rows: equal fingerprints mean identical instances."""
    blob = json.dumps(eval_set, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class _Item:
    """One (mode, instance) pair: the generation it needs, what it is scored against, and where it sits."""

    mode: str
    seed: int
    kind: str
    family: str
    job: Job
    target: Instance  # the oracle the output is scored against (restart: the update moved to word 0)
    at: int | None  # new tokens before the first update lands (for tokens-to-revision)
    reference: Job | None = None  # the no-update generation: a distractor's must reproduce it; a correction's join
    # reads from it how the word in progress at the landing would have gone on
    position: float | None = None  # sweep: relative update position
    landing: str | None = None  # sweep: where in the text the update lands (data.LANDINGS)


def _make_item(mode: str, seed: int, kind: str, row: dict, tokenizer, prompt_format: PromptFormat) -> _Item | None:
    """Turn a dataset row into what `mode` generates and scores; None where the mode does not apply."""
    inst = instance_from_row(row)
    model_key, update_mode = RUNNERS[mode]
    texts = list(row["update_texts"])
    target, at = inst, None
    plain = prompt_format.prompt(inst.family, inst.instruction)
    if model_key == "backbone":  # restart (and the backbone reference): a new prompt, no mid-stream updates
        if len(texts) > 1:
            return None
        prompt = prompt_format.restart_prompt(inst.family, inst.instruction, texts) if texts else plain
        updates = ()
        if texts and kind not in DISTRACTOR_KINDS:
            target, at = get_family(inst.family).with_update_at(inst, 0), 0  # oracle of `restart_response(row)`
    else:
        prompt = plain
        updates = tuple(zip(update_ats(tokenizer, row["segments"]), texts, strict=True))
        at = updates[0][0] if updates else None
    job = Job(model_key, prompt, updates, update_mode if updates else None)
    mid_answer = bool(updates) and kind in JOIN_KINDS  # (restart has no updates: its correction is in the prompt)
    reference = Job(model_key, plain, (), None) if kind in DISTRACTOR_KINDS or mid_answer else None
    position = relative_position(row) if kind == "sweep" else None
    landing = landing_kind(inst.updates[0].shift) if kind == "sweep" else None
    return _Item(mode, seed, kind, inst.family, job, target, at, reference, position, landing)


# ----------------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """A decoded response: new token ids up to (not including) EOS, the text, and whether EOS was reached."""

    ids: list[int]
    text: str
    ended: bool
    unlanded: int = 0  # updates whose `at` lay past the end of generation
    decisions: tuple[str | None, ...] = ()  # per update, the model's decision (workspace mode), else None


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    updates: Sequence[Sequence[tuple[int, str]]] | None,
    update_mode: str | None,
    max_new_tokens: int,
) -> list[Generation]:
    """Greedy generation for left-padded prompts (one mode per batch); decodes the new tokens up to EOS."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [encode(tokenizer, p) for p in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, ids in enumerate(encoded):
        input_ids[b, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, width - len(ids) :] = 1
    device = _device(model)
    kwargs: dict[str, Any] = dict(
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
        return_dict_in_generate=True,
    )
    if update_mode is not None:
        kwargs |= dict(updates=[list(u) for u in updates], update_mode=update_mode, tokenizer=tokenizer)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*never landed.*")  # counted below instead
        out = model.generate(input_ids.to(device), **kwargs)
    landings = getattr(out, "update_landings", None) or [[] for _ in prompts]
    results = []
    for b, new in enumerate(out.sequences[:, width:].tolist()):
        ended = eos in new
        ids = new[: new.index(eos)] if ended else new
        text = tokenizer.decode(ids, skip_special_tokens=True)
        unlanded = sum(landing.at is None for landing in landings[b])
        decisions = tuple(getattr(landing, "kind", None) for landing in landings[b])
        results.append(Generation(ids, text, ended, unlanded, decisions))
    return results


def _run_jobs(
    jobs: Iterable[Job], models: dict[str, Any], tokenizer, max_new_tokens: int, batch_size: int, progress: bool
) -> dict[Job, Generation]:
    """Generate every distinct job once: grouped by (model, update_mode), batched in order of where their updates land
    and of prompt length (a landing step runs the correction's tokens through the whole batch: rows landing at the same
    steps share them; similar lengths pad little)."""
    from tqdm.auto import tqdm

    groups: dict[tuple[str, str | None], list[Job]] = defaultdict(list)
    for job in dict.fromkeys(jobs):
        groups[(job.model_key, job.update_mode)].append(job)
    done: dict[Job, Generation] = {}
    with tqdm(total=sum(map(len, groups.values())), desc="eval", unit="gen", disable=not progress) as bar:
        for (model_key, update_mode), group in groups.items():
            group.sort(key=lambda j: ([at for at, _ in j.updates], len(j.prompt)))
            for start in range(0, len(group), batch_size):
                batch = group[start : start + batch_size]
                bar.set_postfix_str(f"{model_key}/{update_mode or 'plain'}")
                gens = generate_batch(
                    models[model_key],
                    tokenizer,
                    [j.prompt for j in batch],
                    [j.updates for j in batch],
                    update_mode,
                    max_new_tokens,
                )
                done.update(zip(batch, gens, strict=True))
                bar.update(len(batch))
    return done


# ----------------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------------


def tokens_to_revision(tokenizer: Any, target: Instance, at: int, generated_ids: Sequence[int], ended: bool) -> int:
    """New tokens after `at` during which the output still followed the pre-update course.

    Defined on a correct instance: the pre-update course is the tokens of the original response after the first
    update's word boundary, plus EOS; the count is the index of the first generated token after `at` that differs
    from it (for an exact-match family: the first token that agrees with the oracle where the pre-update text would
    not). Restart counts from the start of its new response (its `at` is 0).
    """
    k = target.updates[0].word_index
    pre = encode(tokenizer, target.original_response[word_boundary(target.original_response, k) :])
    pre = [*pre, tokenizer.eos_token_id]
    gen = [*generated_ids[at:], *([tokenizer.eos_token_id] if ended else [])]
    return next((i for i, (g, p) in enumerate(zip(gen, pre, strict=False)) if g != p), min(len(gen), len(pre)))


def join_excerpt(text: str, cut: int, update: str, width: int = 40) -> str:
    """The text around a landing, the correction shown where it landed: `...this⟨The name is Ben.⟩Dear Ben,...`."""
    return f"{text[max(0, cut - width) : cut]}⟨{update}⟩{text[cut : cut + width]}"


def _score(item: _Item, done: dict[Job, Generation], tokenizer) -> dict[str, Any]:
    """Per-instance record: correct / contradiction (corrected kinds), stable (distractor), exact (none), ttr."""
    gen = done[item.job]
    record: dict[str, Any] = {
        "mode": item.mode,
        "seed": item.seed,
        "kind": item.kind,
        "family": item.family,
        "position": item.position,
        "landing": item.landing,
        "unlanded": gen.unlanded,
        # characters of the generated text before each update landed (where it would have, past the end)
        "landed": [len(tokenizer.decode(gen.ids[:at], skip_special_tokens=True)) for at, _ in item.job.updates],
    }
    family = get_family(item.family)
    if item.kind == "none":  # the family's rule (exact match, or any valid answer of a free-form family)
        record["exact"] = bool(family.score(item.target, gen.text)["correct"])
    elif item.kind in DISTRACTOR_KINDS:
        record["stable"] = gen.text == done[item.reference].text
    else:
        landed = record["landed"] or [0]
        scores = family.score(item.target, gen.text, landed)
        record |= {"correct": bool(scores["correct"]), "contradiction": bool(scores["contradiction"])}
        if item.kind == "one" and scores["correct"]:
            record["ttr"] = tokens_to_revision(tokenizer, item.target, item.at, gen.ids, gen.ended)
        if item.job.updates and item.kind in JOIN_KINDS and not gen.unlanded:  # a correction landed mid-answer
            reference = done[item.reference].text if item.reference else None
            record["join"] = answer_join(item.target, gen.text, landed, reference)
            record["clean_join"] = record["join"] == "clean"
            record["join_excerpt"] = join_excerpt(gen.text, landed[0], item.job.updates[0][1])
    if gen.decisions and all(gen.decisions):  # a mode that decides: every update of the row decided right
        expected = "backchannel" if item.kind in DISTRACTOR_KINDS else "correction"
        record["decided"] = all(decision == expected for decision in gen.decisions)
    return record


def _aggregate(records: list[dict], modes: Sequence[str], families: Sequence[str]) -> dict[str, dict]:
    """Pool the records over seeds: every metric per mode, overall and per family, with 95% CIs."""
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        by[(r["mode"], r["kind"])].append(r)
    metrics: dict[str, dict] = {}
    for mode in modes:
        metrics[mode] = {}
        for name, (kinds, key) in PROPORTIONS.items():
            rows = [r for kind in kinds for r in by[(mode, kind)] if key in r]
            metrics[mode][name] = {
                "overall": proportion([r[key] for r in rows]),
                "per_family": {f: proportion([r[key] for r in rows if r["family"] == f]) for f in families},
            }
        rows = [r for r in by[(mode, "one")] if "ttr" in r]
        metrics[mode]["tokens_to_revision"] = {
            "overall": mean_stat([r["ttr"] for r in rows]),
            "per_family": {f: mean_stat([r["ttr"] for r in rows if r["family"] == f]) for f in families},
        }
    return metrics


def _sweep(records: list[dict], modes: Sequence[str]) -> dict[str, Any]:
    """Revision accuracy vs relative update position, in SWEEP_BINS equal bins (early .. late), and by landing kind
    (before the space, after it, inside a word)."""
    labels = [f"{100 * i // SWEEP_BINS}-{100 * (i + 1) // SWEEP_BINS}%" for i in range(SWEEP_BINS)]
    curves, by_landing = {}, {}
    for mode in modes:
        bins: list[list[bool]] = [[] for _ in range(SWEEP_BINS)]
        landings: dict[str, list[bool]] = {landing: [] for landing in LANDINGS}
        for r in records:
            if r["mode"] == mode and r["kind"] == "sweep":
                bins[min(int(r["position"] * SWEEP_BINS), SWEEP_BINS - 1)].append(r["correct"])
                landings[r.get("landing") or "before_space"].append(r["correct"])
        if any(bins):
            curves[mode] = [proportion(b) for b in bins]
            by_landing[mode] = {landing: proportion(hits) for landing, hits in landings.items()}
    centers = [(i + 0.5) / SWEEP_BINS for i in range(SWEEP_BINS)]
    return {"bins": labels, "centers": centers, "modes": curves, "landings": by_landing}


# ----------------------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------------------


def evaluate(
    model: Any,
    tokenizer: Any,
    *,
    n_per_family: int = 20,
    seeds: Sequence[int] = (0,),
    modes: Sequence[str] = DEFAULT_MODES,
    tdm_model: Any = None,
    batch_size: int = 32,
    sweep_per_family: int = 4,
    progress: bool = True,
    families: Sequence[str] | None = None,
    max_new_tokens: int | None = None,
    shots: int = 0,
    split: str = "test",
    kinds: Sequence[str] = KINDS,
) -> dict[str, Any]:
    """Run every mode on the same held-out instances and return JSON-able results (see `render_markdown`).

    Instances come from `build_eval_set(seeds, n_per_family, sweep_per_family, families, split, kinds)`; "tdm" is
    added when `tdm_model` is given. Metrics are pooled over seeds; proportions carry Wilson 95% CIs. A tokenizer
    with a chat template gets its chat format, with `shots` solved examples per family before each question
    (`PromptFormat`).
    """
    modes = list(dict.fromkeys([*modes, *(["tdm"] if tdm_model is not None else [])]))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"`modes`: unknown {unknown}; choose from {list(MODES)}")
    if "tdm" in modes and tdm_model is None:
        raise ValueError("`modes` includes 'tdm' but no `tdm_model` was given")
    if n_per_family < 1 or batch_size < 1 or sweep_per_family < 0:
        raise ValueError("`n_per_family` and `batch_size` must be >= 1 and `sweep_per_family` >= 0")
    families = list(families or FAMILIES)
    for name in families:
        get_family(name)  # clear error for an unknown family
    unknown_kinds = [k for k in kinds if k not in KINDS]
    if unknown_kinds or not kinds:
        raise ValueError(f"`kinds`: unknown or none {unknown_kinds}; choose from {list(KINDS)}")
    kinds, impossible = possible_kinds(kinds, families)
    if impossible:
        warnings.warn(f"skipping kinds {impossible}: no family in {families} has instances of them", stacklevel=2)
    if not kinds:
        raise ValueError(f"`kinds`: none of {impossible} can be built for the families {families}")
    eval_set = build_eval_set(seeds, n_per_family, sweep_per_family, families, split, kinds)
    prompt_format = PromptFormat.for_tokenizer(tokenizer, shots)

    items = [
        item
        for mode in [*modes, BACKBONE]
        for seed, rows_by_kind in eval_set.items()
        for kind, rows in rows_by_kind.items()
        if mode != BACKBONE or kind == "none"
        for row in rows
        if (item := _make_item(mode, seed, kind, row, tokenizer, prompt_format)) is not None
    ]
    longest = max(
        len(encode(tokenizer, text)) for it in items for text in (it.target.response, it.target.original_response)
    )
    max_new_tokens = max_new_tokens or longest + 1 + max(4, longest // 4)  # +EOS, plus room to overshoot

    start = time.perf_counter()
    with _eval_mode(model, tdm_model):
        models = {"duplex": model, "backbone": model.get_base_model(), "tdm": tdm_model}
        jobs = [j for it in items for j in (it.job, it.reference) if j is not None]
        done = _run_jobs(jobs, models, tokenizer, max_new_tokens, batch_size, progress)
    seconds = time.perf_counter() - start

    records = [_score(it, done, tokenizer) for it in items]
    generations = [_generation_record(it, record, done) for it, record in zip(items, records, strict=True)]
    diagnostics = None
    if hasattr(model, "workspace_versions"):  # a DuplexForCausalLM (not a generate-only stand-in)
        with _eval_mode(model):
            one_rows = [row for rows in eval_set.values() for row in rows.get("one", [])]
            diagnostics = teacher_forced_diagnostics(model, tokenizer, one_rows, batch_size, prompt_format)
    columns = [*modes, BACKBONE]
    examples = {
        mode: [
            {
                "prompt": it.job.prompt,
                "updates": [list(u) for u in it.job.updates],
                "oracle": it.target.response,
                "generated": done[it.job].text,
            }
            for it in items
            if it.mode == mode and it.kind == "one"
        ][:3]
        for mode in modes
    }
    joins = {
        mode: {
            "reasons": {
                reason: sum(r.get("join") == reason for r in records if r["mode"] == mode)
                for reason in ("clean", "glued", "restart", "ended")
            },
            "examples": [
                {"family": r["family"], "kind": r["kind"], "join": r["join"], "excerpt": r["join_excerpt"]}
                for reason in ("glued", "restart", "ended", "clean")
                for r in sorted(  # mid-text landings first: a landing before the first word joins trivially
                    (r for r in records if r["mode"] == mode and r.get("join") == reason),
                    key=lambda r: r["join_excerpt"].startswith("⟨"),
                )[:3]
            ],
        }
        for mode in modes
        if any("join" in r for r in records if r["mode"] == mode)
    }
    return {
        "config": {
            "n_per_family": n_per_family,
            "seeds": [int(s) for s in seeds],
            "families": families,
            "modes": modes,
            "sweep_per_family": sweep_per_family,
            "prompt_format": {"chat": prompt_format.chat, "shots": shots},
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "split": split,
            "instances": fingerprint(eval_set),
            "counts": {kind: sum(len(k.get(kind, [])) for k in eval_set.values()) for kind in [*KINDS, "sweep"]},
        },
        "columns": columns,
        "metrics": _aggregate(records, columns, families),
        "sweep": _sweep(records, modes),
        "teacher_forced": diagnostics,
        "unlanded_updates": {m: sum(r["unlanded"] for r in records if r["mode"] == m) for m in modes},
        "reference": REFERENCE,
        "timing": {
            "seconds": seconds,
            "generations": len(done),
            "seconds_per_100_generations": 100 * seconds / max(len(done), 1),
        },
        "examples": examples,
        "joins": joins,
        "generations": generations,
    }


def _generation_record(item: _Item, record: dict, done: dict[Job, Generation]) -> dict[str, Any]:
    """One line of generations.jsonl: what was asked, where the updates landed, what came out and how it scored."""
    scores = ("landed", "correct", "contradiction", "stable", "exact", "join")
    return {
        "mode": item.mode,
        "kind": item.kind,
        "family": item.family,
        "instruction": item.target.instruction,
        "updates": [list(update) for update in item.job.updates],
        "generated": done[item.job].text,
        "oracle": item.target.response,
    } | {key: record[key] for key in scores if key in record}


@torch.no_grad()
def teacher_forced_diagnostics(
    model: Any, tokenizer: Any, rows: Sequence[dict], batch_size: int = 32, prompt_format: PromptFormat | None = None
) -> dict:
    """Teacher-forced accuracy after the first update, with the updates in the workspace and without them (ignore):
    per token (all post-update tokens; the first; the decision tokens, where a correction first changes the answer)
    and per row (every post-update token right, which is what greedy exact match needs). Set beside greedy exact
    match, it shows where decoding leaves the oracle."""
    collator = DuplexCollator(tokenizer.pad_token_id, decisions=True)
    device = _device(model)
    names = ("post_update_token", "first_post_update_token", "decision_token", "all_post_update_tokens")
    hits: dict[str, dict[str, list[bool]]] = {m: {n: [] for n in names} for m in ("workspace", "ignore")}
    for start in range(0, len(rows), batch_size):
        features = [tokenize_row(row, tokenizer, "duplex", prompt_format) for row in rows[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collator(features).items()}
        labels = batch.pop("labels")[:, 1:]
        decisions = batch.pop("decision_mask")[:, 1:]
        first_update = batch["update_positions"][:, 0]  # position whose logits predict the first post-update token
        positions = torch.arange(labels.shape[1], device=device)[None]
        after = (positions >= first_update[:, None]) & (labels != IGNORE_INDEX)
        first = positions == first_update[:, None]
        updates = {k: batch.pop(k) for k in ("update_input_ids", "update_attention_mask", "update_positions")}
        for mode, extra in (("workspace", updates), ("ignore", {})):
            correct = model(**batch, **extra).logits[:, :-1].argmax(-1) == labels
            counts = hits[mode]
            counts["post_update_token"] += correct[after].tolist()
            counts["first_post_update_token"] += correct[first].tolist()
            counts["decision_token"] += correct[decisions & after].tolist()
            counts["all_post_update_tokens"] += (correct | ~after).all(dim=1).tolist()
    return {mode: {f"{n}_accuracy": proportion(flags) for n, flags in counts.items()} for mode, counts in hits.items()}


@contextlib.contextmanager
def _eval_mode(*models) -> Iterator[None]:
    """Put the given models in eval mode for the duration, then restore their training flags."""
    models = [m for m in models if m is not None and hasattr(m, "train")]
    flags = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, flag in zip(models, flags, strict=True):
            m.train(flag)


# ----------------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------------


def _pct(stat: dict | None, ci: bool = True) -> str:
    if not stat or stat.get("rate") is None:
        return "—"
    text = f"{100 * stat['rate']:.1f}%"
    return f"{text} ({100 * stat['ci'][0]:.1f}–{100 * stat['ci'][1]:.1f})" if ci else text


def _mean(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    return f"{stat['mean']:.2f} ({stat['ci'][0]:.2f}–{stat['ci'][1]:.2f})"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(results: dict[str, Any]) -> str:
    """Markdown: metrics x modes with 95% CIs (and the toy prototype's reference), per-family revision accuracy,
    and the position sweep."""
    cfg, metrics, columns = results["config"], results["metrics"], results["columns"]
    modes = [c for c in columns if c != BACKBONE]
    timing = results["timing"]
    lines = [
        "## Duplex evaluation",
        "",
        f"Held-out `{cfg['split']}` instances (fingerprint `{cfg['instances']}`), {cfg['n_per_family']} per family and"
        f" kind, seeds {cfg['seeds']}; 95% CIs (Wilson for rates). {timing['generations']} generations in"
        f" {timing['seconds']:.1f} s ({timing['seconds_per_100_generations']:.2f} s per 100).",
        "",
    ]
    if (fmt := cfg.get("prompt_format")) and fmt["chat"]:
        lines[-1:-1] = [
            f"Prompts: the tokenizer's chat template, {fmt['shots']} solved example(s) per family before each question;"
            " an in-band correction is a user turn spliced in mid-answer.",
            "",
        ]
    rows = []
    for name, label in METRIC_LABELS.items():
        n = max((metrics[c][name]["overall"]["n"] for c in columns), default=0)
        fmt = _mean if name == "tokens_to_revision" else _pct
        ref = REFERENCE.get(name)
        ref_text = f"{100 * ref['workspace']:.1f}% (ablation {100 * ref['ignore']:.1f}%)" if ref else ""
        rows.append([f"{label} (n={n})", *(fmt(metrics[c][name]["overall"]) for c in columns), ref_text])
    base = metrics[BACKBONE]["retention"]["overall"]["rate"]
    gaps = [
        "—" if base is None or (r := metrics[m]["retention"]["overall"]["rate"]) is None else f"{100 * (r - base):+.1f}"
        for m in modes
    ]
    rows.append(["retention − backbone (points)", *gaps, "", ""])
    lines += _table(["metric", *columns, "reference (toy prototype)"], rows)
    lines += [
        "",
        "`backbone`: the frozen backbone alone, no updates (retention reference). `restart`: the backbone re-prompted"
        " with the instruction and the correction as one new turn (`{instruction}\\n{correction}\\n`; a chat model: one"
        " user turn of its chat template), scored against the oracle for an update at word 0 (single-update"
        " instances; distractor stability is against the backbone's own no-update output). Tokens-to-revision: on"
        " correct single-update instances, new tokens after the update before the output leaves the pre-update"
        " course. Reference: the toy prototype reached 55% revision accuracy (ablation 4.4%) and a 3.6%"
        " contradiction rate (ablation 40.2%).",
        "",
        "### Per family: retention of the backbone alone, revision accuracy of each mode",
        "",
    ]
    lines += _table(
        ["family", "backbone retention", *modes],
        (
            [
                f,
                _pct(metrics[BACKBONE]["retention"]["per_family"][f]),
                *(_pct(metrics[m]["revision_accuracy"]["per_family"][f]) for m in modes),
            ]
            for f in cfg["families"]
        ),
    )
    if tf := results.get("teacher_forced"):
        lines += ["", "### Teacher-forced diagnostics (single-update instances)", ""]
        lines += _table(
            ["metric", *tf],
            (
                [label, *(_pct(tf[m][key]) for m in tf)]
                for key, label in (
                    ("post_update_token_accuracy", "post-update token accuracy"),
                    ("first_post_update_token_accuracy", "first post-update token accuracy"),
                    ("decision_token_accuracy", "decision token accuracy (where a correction first changes the text)"),
                    ("all_post_update_tokens_accuracy", "rows with every post-update token right"),
                )
                if key in tf[next(iter(tf))]  # reports written before a row was added still render
            ),
        )
        lines += [
            "",
            "Per token on the oracle's own text; the last row is what greedy exact match needs, so it tracks the "
            "revision accuracy above (the list family's rule also accepts other members).",
        ]
    sweep = results["sweep"]
    if sweep["modes"]:
        lines += ["", "### Revision accuracy vs update position (sweep)", ""]
        curves = sweep["modes"]
        lines += _table(
            ["position", *curves],
            (
                [label, *(f"{_pct(curves[m][i], ci=False)} (n={curves[m][i]['n']})" for m in curves)]
                for i, label in enumerate(sweep["bins"])
            ),
        )
        if landings := sweep.get("landings"):
            lines += ["", "By where the update lands (every landing point of the swept instances):", ""]
            lines += _table(
                ["landing", *landings],
                (
                    [label, *(f"{_pct(landings[m][key])} (n={landings[m][key]['n']})" for m in landings)]
                    for key, label in zip(
                        LANDINGS, ("before the space", "after the space", "inside a word"), strict=True
                    )
                ),
            )
    if joins := results.get("joins"):
        lines += ["", "### How corrected answers join (every corrected answer whose correction landed mid-answer)", ""]
        lines += _table(
            ["mode", "clean", "glued onto a word", "restarts the answer", "nothing after it"],
            ([m, *(str(j["reasons"][k]) for k in ("clean", "glued", "restart", "ended"))] for m, j in joins.items()),
        )
        lines += ["", "Examples (the correction shown where it landed):", ""]
        for mode, j in joins.items():
            lines += [f"- {mode}, {e['family']}, {e['join']}: `{_excerpt_md(e['excerpt'])}`" for e in j["examples"]]
    unlanded = {m: n for m, n in results.get("unlanded_updates", {}).items() if n}
    if unlanded:
        lines += ["", f"Updates that never landed (generation ended before `at`): {unlanded}."]
    return "\n".join(lines) + "\n"


def _excerpt_md(text: str) -> str:
    return text.replace("\n", "\\n").replace("`", "'")


def plot_sweep(results: dict[str, Any], path: str | Path) -> Path:
    """PNG of revision accuracy vs relative update position, one line (with its 95% CI band) per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["sweep"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = [100 * c for c in sweep["centers"]]
    for mode, curve in sweep["modes"].items():
        pts = [(xi, s["rate"], s["ci"]) for xi, s in zip(x, curve, strict=True) if s["rate"] is not None]
        if not pts:
            continue
        xs, ys, cis = zip(*pts, strict=True)
        (line,) = ax.plot(xs, [100 * y for y in ys], marker="o", label=mode)
        ax.fill_between(xs, [100 * c[0] for c in cis], [100 * c[1] for c in cis], color=line.get_color(), alpha=0.12)
    ax.set(
        xlabel="update position (% of the response's words)",
        ylabel="revision accuracy (%)",
        ylim=(-2, 102),
        xlim=(0, 100),
        title="Revision accuracy vs update position",
    )
    ax.set_xticks(x, sweep["bins"])
    ax.grid(alpha=0.3)
    if sweep["modes"]:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md, sweep.png and generations.jsonl (every output, scored) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "markdown": out / "results.md",
        "plot": out / "sweep.png",
        "generations": out / "generations.jsonl",
    }
    results = dict(results)
    generations = results.pop("generations", [])
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["generations"].write_text("".join(json.dumps(g) + "\n" for g in generations))
    paths["markdown"].write_text(render_markdown(results))
    plot_sweep(results, paths["plot"])
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# Loading and the CLI
# ----------------------------------------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | Path, device: str = "cpu", dtype: str = "float32", backbone: str | Path | None = None
) -> tuple[Any, Any]:
    """A saved Duplex checkpoint and its tokenizer, offline, in eval mode on `device` with `dtype`. A plain causal LM
    (a backbone) is wrapped in fresh duplex modules: exactly the backbone, for its restart and in-band ceilings.
    `backbone`: for an adapter-only checkpoint, a local copy of the backbone its config names."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_duplex import DuplexForCausalLM

    torch_dtype = getattr(torch, dtype)
    extra = {"backbone_name_or_path": str(backbone)} if backbone else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=torch_dtype, **extra)
    # trust_remote_code: AutoTokenizer reads config.json (auto_map) and would otherwise ask on stdin
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    if not hasattr(model, "workspace_versions"):  # in-band as the backbone's chat template writes a user turn
        model = DuplexForCausalLM.from_backbone(
            model, inband_template=PromptFormat.for_tokenizer(tokenizer).inband_template
        )
    return model.to(device).eval(), tokenizer


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="Duplex checkpoint directory (save_pretrained output), or a plain backbone (with --modes inband restart)",
    )
    parser.add_argument(
        "--backbone", default=None, help="adapter-only checkpoint: a local copy of the backbone its config names"
    )
    parser.add_argument("--tdm-checkpoint", help="fully fine-tuned in-band baseline checkpoint: adds the 'tdm' mode")
    parser.add_argument("--out", default=None, help="report directory (default: CHECKPOINT/eval)")
    parser.add_argument("--n-per-family", type=_positive, default=20, help="instances per family and kind, per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="test-set seeds (pooled)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES), help="modes to compare")
    parser.add_argument(
        "--families",
        nargs="+",
        choices=[*FAMILIES, *CHAT_FAMILIES],
        default=None,
        help="task families (default: the seven; `items` and `letter` score a chat model's free-form answers)",
    )
    parser.add_argument("--sweep-per-family", type=_non_negative, default=4, help="instances per family swept")
    parser.add_argument(
        "--split",
        choices=["test", "outside"],
        default="test",
        help="held-out values of the training pools (test) or values outside every pool (outside)",
    )
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS), help="instance kinds")
    parser.add_argument(
        "--shots", type=_non_negative, default=0, help="solved examples per family before each chat prompt"
    )
    parser.add_argument("--batch-size", type=_positive, default=32)
    parser.add_argument("--max-new-tokens", type=_positive, default=None, help="default: longest oracle + margin")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point: load, evaluate, write the report, print the Markdown table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if "tdm" in args.modes and not args.tdm_checkpoint:
        parser.error("--modes tdm needs --tdm-checkpoint")
    for path in filter(None, [args.checkpoint, args.tdm_checkpoint]):
        if not Path(path, "config.json").is_file():
            parser.error(f"{path} is not a checkpoint directory (no config.json)")
    model, tokenizer = load_checkpoint(args.checkpoint, args.device, args.dtype, args.backbone)
    tdm_model = load_checkpoint(args.tdm_checkpoint, args.device, args.dtype)[0] if args.tdm_checkpoint else None
    results = evaluate(
        model,
        tokenizer,
        n_per_family=args.n_per_family,
        seeds=args.seeds,
        modes=args.modes,
        tdm_model=tdm_model,
        batch_size=args.batch_size,
        sweep_per_family=args.sweep_per_family,
        progress=not args.no_progress,
        families=args.families,
        max_new_tokens=args.max_new_tokens,
        shots=args.shots,
        split=args.split,
        kinds=args.kinds,
    )
    results["config"] |= {"checkpoint": str(args.checkpoint), "tdm_checkpoint": args.tdm_checkpoint}
    write_report(results, args.out or Path(args.checkpoint) / "eval")
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
