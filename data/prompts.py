"""How task text becomes model text.

The tiny byte-level backbone reads plain text: `instruction\\n`, answer, corrections between newlines. A chat model
(SmolLM2-Instruct, Qwen3 chat) reads its own chat template: the instruction is a user turn, the answer the assistant
turn, a correction in-band a new user turn spliced in mid-answer, and a restart one user turn holding the instruction
and the correction. `shots` solved examples of the same family (from the training split) may precede the question,
the few-shot format that makes a small chat model's own ceiling worth measuring.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any

from .tasks import CATEGORIES, FAMILIES, NAMES, TOPICS, WORDS, Instance, get_family, tokens
from .tokenizer import CHAT_TEMPLATE as BYTE_CHAT_TEMPLATE

PLAIN_INBAND_TEMPLATE = "\n{text}\n"
_MARK = "\x00DUPLEX-ANSWER\x00"  # a stand-in answer, to cut the in-band template out of a rendered chat


@dataclass(frozen=True)
class PromptFormat:
    """Plain text (`tokenizer=None`) or `tokenizer`'s chat template, with `shots` solved examples per family."""

    tokenizer: Any = None
    shots: int = 0

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, shots: int = 0) -> PromptFormat:
        """The chat format where the tokenizer has a chat template, plain text otherwise (the byte-level backbone)."""
        if shots < 0:
            raise ValueError(f"`shots` must be >= 0, got {shots}")
        template = getattr(tokenizer, "chat_template", None)
        chat = bool(template) and template != BYTE_CHAT_TEMPLATE  # the byte tokenizer's template writes plain text
        if shots and not chat:
            raise ValueError(f"`shots={shots}` needs a tokenizer with a chat template; this one writes plain text")
        return cls(tokenizer if chat else None, shots)

    @property
    def chat(self) -> bool:
        return self.tokenizer is not None

    @functools.cached_property
    def inband_template(self) -> str:
        """The text around a correction spliced into the answer (`DuplexConfig.inband_template`): for a chat model,
        the end of the assistant turn, a user turn with the correction, and the start of the next assistant turn."""
        if not self.chat:
            return PLAIN_INBAND_TEMPLATE
        messages = [_user("q"), _assistant(_MARK), _user("{text}")]
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return rendered.split(_MARK, 1)[1]

    def prompt(self, family: str, instruction: str) -> str:
        """What the model reads before its answer."""
        if not self.chat:
            return instruction + "\n"
        return self._render([*_solved_examples(family, self.shots, restart=False), _user(instruction)])

    def restart_prompt(self, family: str, instruction: str, corrections: list[str]) -> str:
        """The half-duplex baseline's prompt: stop, give the instruction and the correction(s) as one new turn."""
        turn = "\n".join([instruction, *corrections])
        if not self.chat:
            return turn + "\n"
        return self._render([*_solved_examples(family, self.shots, restart=bool(corrections)), _user(turn)])

    def _render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@functools.cache
def _solved_examples(family: str, shots: int, restart: bool) -> tuple[dict, ...]:
    """`shots` solved training instances of `family`, fixed per family: plain answers, the last one corrected
    mid-answer (it shows how an in-band correction is followed: go on from where it landed); or, for a restart, an
    instruction with its correction and the answer that follows it from the first word."""
    rng = random.Random(f"duplex:shots:{family}")
    messages = []
    for shot in range(shots):
        corrected_mid_answer = not restart and shots > 1 and shot == shots - 1
        landing = "start" if restart else "middle" if corrected_mid_answer else None
        inst = _real_word_example(family, rng, landing)
        if restart:
            messages += [_user("\n".join([inst.instruction, inst.updates[0].text])), _assistant(inst.response)]
        elif corrected_mid_answer:
            before, after = inst.segments()
            messages += [_user(inst.instruction), _assistant(before), _user(inst.updates[0].text), _assistant(after)]
        else:
            messages += [_user(inst.instruction), _assistant(inst.original_response)]
    return tuple(messages)


def _real_word_example(family: str, rng: random.Random, landing: str | None) -> Instance:
    """A training instance made of real words only (training draws random letter strings too, which a few-shot
    prompt would teach the model to copy), with no correction (`landing=None`) or one before the first word
    ("start") or after it ("middle")."""
    tasks = get_family(family)
    while True:
        inst = tasks.sample(rng, "train", n_updates=int(landing is not None))
        if landing == "start":
            if 0 not in tasks.word_indices(inst):
                continue
            inst = tasks.with_update_at(inst, 0)
        elif landing == "middle" and inst.updates[0].word_index == 0:
            continue
        text = " ".join([inst.instruction, inst.original_response, inst.response, *(u.text for u in inst.updates)])
        if all(len(t) < 2 or t.isdigit() or t.lower() in _known_words() for t in tokens(text)):
            return inst


@functools.cache
def _known_words() -> frozenset[str]:
    """Every real word the task families use: their value pools and the words of their test-split instances."""
    words = [*WORDS, *NAMES, *TOPICS, *CATEGORIES, *(w for pool in CATEGORIES.values() for w in pool)]
    rng = random.Random("duplex:known-words")
    for family in FAMILIES:
        for _ in range(50):
            inst = get_family(family).sample(rng, "test", n_updates=1)
            words += tokens(" ".join([inst.instruction, inst.response, inst.updates[0].text]))
    return frozenset(w.lower() for w in words)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}
