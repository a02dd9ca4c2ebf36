"""Build `datasets.Dataset`s of task instances (one row per instance) and read rows back."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping

import datasets

from .tasks import FAMILIES, HELD_OUT_DISTRACTORS, LANDINGS, Instance, TaskFamily, TaskUpdate, get_family

# Kinds of instance in a mix: (number of updates, distractor?, where the updates land: None = `build_dataset`'s
# `landing`). "held_out_distractor": a backchannel that no training row uses (HELD_OUT_DISTRACTORS), for the
# evaluation only. "one_after_space" / "one_in_word": one correction landing after the space / inside a word.
MIX_KINDS: dict[str, tuple[int, bool, str | None]] = {
    "none": (0, False, None),
    "one": (1, False, None),
    "one_after_space": (1, False, "after_space"),
    "one_in_word": (1, False, "in_word"),
    "distractor": (1, True, None),
    "held_out_distractor": (1, True, None),
    "two": (2, False, None),
    "three": (3, False, None),
}
DEFAULT_MIX: dict[str, float] = {"none": 0.2, "one": 0.5, "distractor": 0.1, "two": 0.15, "three": 0.05}

FEATURES = datasets.Features(
    {
        "family": datasets.Value("string"),
        "instruction": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "response": datasets.Value("string"),
        "original_response": datasets.Value("string"),
        "update_word_indices": datasets.List(datasets.Value("int32")),
        "update_texts": datasets.List(datasets.Value("string")),
        "update_kinds": datasets.List(datasets.Value("string")),
        "update_shifts": datasets.List(datasets.Value("int32")),  # where each lands (`TaskUpdate.shift`)
        "invalidated": datasets.List(datasets.Value("string")),
        "segments": datasets.List(datasets.Value("string")),
        "update_change_offsets": datasets.List(datasets.Value("int32")),
        "meta": datasets.Value("string"),  # JSON: family params and correction values
    }
)


def instance_to_row(inst: Instance) -> dict:
    """Flatten an Instance into a dataset row (see FEATURES)."""
    return {
        "family": inst.family,
        "instruction": inst.instruction,
        "prompt": inst.prompt,
        "response": inst.response,
        "original_response": inst.original_response,
        "update_word_indices": [u.word_index for u in inst.updates],
        "update_texts": [u.text for u in inst.updates],
        "update_kinds": [u.kind for u in inst.updates],
        "update_shifts": [u.shift for u in inst.updates],
        "invalidated": list(inst.invalidated),
        "segments": inst.segments(),
        "update_change_offsets": list(inst.change_offsets),
        "meta": json.dumps(inst.meta),
    }


def instance_from_row(row: dict) -> Instance:
    """Rebuild the Instance of a dataset row, e.g. to score it or sweep its update position."""
    shifts = row.get("update_shifts") or [0] * len(row["update_word_indices"])
    updates = [
        TaskUpdate(int(k), t, kind, int(shift))
        for k, t, kind, shift in zip(
            row["update_word_indices"], row["update_texts"], row["update_kinds"], shifts, strict=True
        )
    ]
    return Instance(
        family=row["family"],
        instruction=row["instruction"],
        prompt=row["prompt"],
        original_response=row["original_response"],
        response=row["response"],
        updates=updates,
        invalidated=list(row["invalidated"]),
        meta=json.loads(row.get("meta") or "{}"),
        change_offsets=list(row.get("update_change_offsets") or [-1] * len(updates)),
    )


def dataset_from_instances(instances: Iterable[Instance]) -> datasets.Dataset:
    """A Dataset with one row per given instance (e.g. a position sweep)."""
    rows = [instance_to_row(i) for i in instances]
    return datasets.Dataset.from_list(rows, features=FEATURES)


def draw_landing(landing: str | Mapping[str, float], family: TaskFamily, rng: random.Random) -> str:
    """`landing` as `TaskFamily.sample` takes it: a name stays; weights draw one of the family's landing kinds."""
    if isinstance(landing, str):
        return landing
    kinds = list(family.landings)
    return rng.choices(kinds, [landing.get(kind, 1.0) for kind in kinds])[0]


def build_dataset(
    split: str,
    n: int,
    seed: int,
    families: list[str] | None = None,
    mix: dict[str, float] | None = None,
    canonical_prob: float = 0.5,
    family_weights: dict[str, float] | None = None,
    landing: str | Mapping[str, float] = "before_space",
) -> datasets.Dataset:
    """`n` instances, families round-robin (or drawn with `family_weights`, default 1 each: more data where a family
    lags), kinds drawn from `mix` (keys of MIX_KINDS). Train uses canonical phrasings with probability
    `canonical_prob`; the held-out splits always do. `landing`: where updates land unless the kind says
    (`TaskFamily.sample`; "any" draws every kind of landing point; a mapping such as {"in_word": 4} draws a kind per
    instance with those weights, kinds not named weighing 1, among the kinds the family has). A kind that lands where
    a family's answers have no such point (inside a word of a spelling) gets no rows of that family."""
    names = list(families or FAMILIES)
    fams = [get_family(f) for f in names]
    unknown_families = set(family_weights or {}) - set(names)
    if unknown_families:
        raise ValueError(f"`family_weights` names families not built here: {sorted(unknown_families)}")
    mix = dict(mix or DEFAULT_MIX)
    unknown = set(mix) - set(MIX_KINDS)
    if unknown:
        raise ValueError(f"unknown mix kinds {sorted(unknown)}; known: {list(MIX_KINDS)}")
    kinds, weights = list(mix), list(mix.values())
    rng = random.Random(f"duplex:{split}:{seed}")
    instances = []
    family_rng = random.Random(f"duplex:{split}:{seed}:families")  # the round-robin draws stay as they were
    family_odds = [(family_weights or {}).get(name, 1.0) for name in names]
    if not isinstance(landing, str):
        unknown_landings = set(landing) - set(LANDINGS)
        if unknown_landings:
            raise ValueError(f"`landing` weighs unknown landing kinds {sorted(unknown_landings)}; known: {LANDINGS}")
    landing_rng = random.Random(f"duplex:{split}:{seed}:landings")  # drawn apart: the other draws stay as they were
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        n_updates, distractor, kind_landing = MIX_KINDS[kind]
        if kind == "held_out_distractor" and split == "train":
            raise ValueError("held-out backchannels are for the held-out splits only, never for training")
        backchannels = HELD_OUT_DISTRACTORS if kind == "held_out_distractor" else None
        canonical = split != "train" or rng.random() < canonical_prob
        family = family_rng.choices(fams, family_odds)[0] if family_weights else fams[i % len(fams)]
        if kind_landing and kind_landing not in family.landings:  # e.g. inside a word of a spelling: none
            continue
        instances.append(
            family.sample(
                rng,
                split,
                n_updates=n_updates,
                distractor=distractor,
                canonical=canonical,
                backchannels=backchannels,
                landing=kind_landing or draw_landing(landing, family, landing_rng),
            )
        )
    return dataset_from_instances(instances)
