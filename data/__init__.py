"""Duplex task data: the seven task families, dataset building and the byte-level tokenizer."""

from .dataset import (
    DEFAULT_MIX,
    FEATURES,
    MIX_KINDS,
    build_dataset,
    dataset_from_instances,
    instance_from_row,
    instance_to_row,
)
from .tasks import (
    CATEGORIES,
    DISTRACTORS,
    EXTRA_DISTRACTORS,
    FAMILIES,
    HELD_OUT_DISTRACTORS,
    Instance,
    TaskFamily,
    TaskUpdate,
    get_family,
    in_split,
    split_pool,
    tokens,
    word_boundary,
)
from .tokenizer import EOS_TOKEN, PAD_TOKEN, build_byte_tokenizer

__all__ = [
    "CATEGORIES",
    "DEFAULT_MIX",
    "DISTRACTORS",
    "EOS_TOKEN",
    "EXTRA_DISTRACTORS",
    "FAMILIES",
    "FEATURES",
    "HELD_OUT_DISTRACTORS",
    "MIX_KINDS",
    "PAD_TOKEN",
    "Instance",
    "TaskFamily",
    "TaskUpdate",
    "build_byte_tokenizer",
    "build_dataset",
    "dataset_from_instances",
    "get_family",
    "in_split",
    "instance_from_row",
    "instance_to_row",
    "split_pool",
    "tokens",
    "word_boundary",
]
