"""How a corrected answer joins the text it interrupts: clean, glued onto a word, restarted, or ended.

A correction lands after N tokens, so in a model's own words it can land between words or inside one. A join a person
accepts goes on with the text in progress (the word is finished, then the corrected content); the evaluation reports
the share of such joins, and answers written for training are held to the same rule.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tasks import Instance, landing_kind


def answer_join(inst: Instance, text: str, landed: Sequence[int], reference: str | None = None) -> str:
    """`join_check` of an answer to `inst` whose updates landed at `landed` (characters of `text`): whether the first
    one lands inside a word comes from the instance, the word in progress from `reference` (the answer as it goes on
    with no update), where there is one."""
    in_word = landing_kind(inst.updates[0].shift) == "in_word"
    finishing = word_in_progress(reference, text, landed[0]) if reference is not None else ""
    return join_check(text, landed, in_word, finishing)


def word_in_progress(reference: str, text: str, cut: int) -> str:
    """The rest of the word the answer was writing where an update landed (`cut`, characters), as the answer went on
    without the update (`reference`, sharing `text`'s first `cut` characters): `quet` for `bou|quet`; "" where the
    cut lies between words or the two texts differ before it."""
    if text[:cut] != reference[:cut]:
        return ""
    end = cut
    while 0 < end < len(reference) and reference[end - 1].isalnum() and reference[end].isalnum():
        end += 1
    return reference[cut:end]


def join_check(text: str, landed: Sequence[int], in_word: bool = False, finishing: str = "") -> str:
    """How an answer goes on where each correction landed (characters of `text`): "clean" where every continuation
    goes on with the text in progress; "glued" where new text is stuck onto a finished word (`thisDear`, `IRome`);
    "restart" where it starts the answer again from its opening (`1. Red: The1. Red: ...`, `... this Dear Ben,`);
    "ended" where nothing follows the correction. `in_word`: the first update lands inside a word, which the text
    may finish (only a capital stuck onto a lowercase letter then counts as glued). `finishing`: the rest of the word
    the answer was writing at the first landing (`word_in_progress`); going on with exactly it finishes that word."""
    opening = next(iter(text.split()), "")
    for j, cut in enumerate(landed):
        after = text[cut:]
        if not after.strip():
            return "ended"
        if 0 < cut < len(text):
            before, first = text[cut - 1], text[cut]
            finishes = j == 0 and bool(finishing) and after.startswith(finishing)
            finishes = finishes and not after[len(finishing) : len(finishing) + 1].isalnum()  # and ends it there
            if (
                before.isalnum()
                and first.isalnum()
                and not finishes
                and (not (in_word and j == 0) or (before.islower() and first.isupper()))
            ):
                return "glued"
        rest = text[_finish_word(text, cut) :].lstrip(" \n\t,.;:!?-")
        if len(opening) >= 2 and cut >= len(opening) and rest.startswith(opening):
            return "restart"
    return "clean"


def _finish_word(text: str, cut: int) -> int:
    """`cut` moved past the lowercase rest of a word it lies inside (the word in progress, finished)."""
    while 0 < cut < len(text) and text[cut - 1].isalnum() and text[cut].isalnum() and not text[cut].isupper():
        cut += 1
    return cut
