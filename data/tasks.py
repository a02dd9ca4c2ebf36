"""Task families for Duplex: instructions, oracle responses, mid-stream updates.

Every family is a tiny word-by-word state machine: `_emit` produces response word i from the
current state and `_apply` changes the state when an update lands before word i. The base
class turns that into instances, validity checks, held-out splits, sweeps and scoring.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
import string
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

SPLITS = ("train", "test", "outside")  # "outside": held-out values no generator ever draws (OUTSIDE_POOLS)

# Canonical backchannels, extra ones used only when canonical=False, and held-out ones no training row ever uses
# (for the evaluation's "held_out_distractor" kind: the update decision must generalise to them).
DISTRACTORS = ["ok", "go on", "mm-hmm", "thanks", "yes", "I see"]
# (no near-copy of a held-out one, such as "sounds fine" or "understood")
EXTRA_DISTRACTORS = [
    "okay", "got it", "sure", "uh-huh", "right", "I hear you", "thank you", "yep", "hmm", "great", "perfect",
    "interesting", "keep going", "oh", "wow", "makes sense", "I get it", "that makes sense", "go ahead",
    "I'm listening", "please continue", "I know", "fair enough", "that's right", "fine", "noted", "I agree",
    "exactly", "thanks a lot", "of course", "yes please", "carry on",
]  # fmt: skip
HELD_OUT_DISTRACTORS = ["alright", "cool", "nice", "I follow", "good", "sounds good", "I understand", "yeah"]

WORDS = """
apple bread chair table water river stone cloud green house mouse horse plant light night
dream smile music paper pencil window garden forest ocean beach storm snow rain wind fire
earth metal glass silver gold iron copper sugar salt honey lemon peach grape melon cherry
tiger zebra camel eagle shark whale snake rabbit monkey panda koala otter sheep goat duck
goose frog crab bird fish bear wolf deer lion king queen knight castle tower bridge road
train plane boat ship truck wheel clock watch phone radio piano drum flute guitar violin
song story book letter word poem movie photo color shape circle square heart brain hand
foot head mouth tooth nose shirt shoe coat hat dress sock glove ring pearl candle lamp
door floor wall roof bed sofa desk shelf cup plate spoon fork knife bowl pot pan oven
basket bottle jacket pocket button ladder mirror pillow ticket rocket planet comet moon
star sun sky hill valley island desert field farm city town village market school office
""".split()

NAMES = """
Anna Ben Clara David Emma Felix Grace Henry Iris Jack Kate Leo Maria Nina Oscar Paul Quinn
Rosa Sam Tom Uma Victor Wendy Xavier Yara Zoe Alice Bruno Chloe Daniel Elena Frank Greta
Hugo Ivan Julia Karl Laura Max Nora Olga Peter Rita Simon Tina Vera Walter Yusuf Zara Adam
Bella Carl Diana Eric Fiona George Hanna Igor Jonas Lena Mia Noah Omar Pia Ralf Sara Theo
""".split()

TOPICS = """
rain music work school dinner travel books money games weather lunch holidays movies science
history art cooking dogs cats flowers trains football tennis chess coffee tea bread cheese
chocolate painting dancing singing hiking camping fishing sailing swimming running cycling
skiing gardening birds stars planets robots computers poetry theater museums maps islands
mountains rivers lakes oceans winter summer spring autumn snow storms bees
""".split()

CATEGORIES: dict[str, list[str]] = {
    "fruits": "apple pear plum fig mango kiwi banana cherry grape lemon lime peach apricot".split(),
    "animals": "dog cat horse cow sheep goat pig lion tiger zebra wolf bear fox rabbit".split(),
    "colors": "red blue green yellow purple pink brown black white gray violet cyan".split(),
    "tools": "hammer saw drill wrench pliers chisel shovel rake axe file level clamp".split(),
    "vegetables": "carrot potato onion garlic pepper cabbage leek pea bean radish spinach".split(),
    "instruments": "piano guitar violin flute drum harp trumpet cello oboe banjo tuba".split(),
    "sports": "tennis golf soccer hockey rugby boxing rowing skiing cricket baseball".split(),
    "drinks": "water tea coffee milk juice soda cocoa cider lemonade smoothie".split(),
}

POOLS: dict[str, list[str]] = {"words": WORDS, "names": NAMES, "topics": TOPICS}

# Values outside every pool above (and every category): what a new user types. The "outside" split draws its words,
# names and topics here, and its case sentences below; training never sees them, so a model scores on them only by
# copying and transforming letters, not by recalling words it was trained on.
OUTSIDE_POOLS: dict[str, list[str]] = {
    "words": """
    basil candy dolphin engine feather jungle kettle lantern marble needle orbit puzzle quilt ribbon saddle tulip
    umbrella vessel walnut yogurt anchor blanket compass donkey falcon hammock igloo jigsaw kayak lobster napkin
    oyster parrot raisin scarf toast velvet wagon muffin pebble
    """.split(),
    "names": """
    Amir Beatrix Cosmo Delia Ezra Freya Gideon Hazel Ingrid Jasper Kofi Linnea Mateo Nadia Orla Priya Rufus Saoirse
    Tobias Ursula Viggo Wanda Xenia Yosef Zelda
    """.split(),
    "topics": """
    volcanoes pottery knitting jazz baking surfing origami fossils puppets kites marathons lighthouses pirates
    dinosaurs recycling archery yoga opera comics bakeries
    """.split(),
}
OUTSIDE_SENTENCES = [
    "the kid sat on my mat",
    "our kids love warm soup",
    "my aunt has two pups",
    "we walk to the park",
    "his car is very old",
    "she sings in the choir",
    "they ate pasta for supper",
    "your keys are on top",
    "this stew is too hot",
    "a big owl flew by",
    "her bike has a flat",
    "our new neighbour is kind",
    "the bus was late again",
    "my brother fixes old radios",
    "we need more eggs",
    "the kitten naps all day",
    "his jokes make me laugh",
    "the soup needs spice",
    "we lost an umbrella",
    "our team won today",
]

_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*")


def tokens(text: str) -> list[str]:
    """Whole word/number tokens of a text (punctuation dropped), used for contradiction checks."""
    return _TOKEN.findall(text)


def in_split(key: str, split: str) -> bool:
    """Deterministic ~80/20 train/test assignment of a value or key by CRC32 (not Python's hash). Keys without an
    outside pool (number pairs, categories) count as test in the "outside" split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return (zlib.crc32(key.encode()) % 5 == 0) == (split != "train")


def split_pool(pool: list[str], split: str) -> list[str]:
    """The part of a value pool that belongs to `split`."""
    return [v for v in pool if in_split(v, split)]


PSEUDO_WORD_PROB = 0.7  # share of training values that are random letter strings
PSEUDO_WORD_LENGTHS = (2, 10)  # from "my"-sized words to long ones


def pseudo_word(rng: random.Random, capitalized: bool = False) -> str:
    """A random lowercase letter string (capitalised for names)."""
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(*PSEUDO_WORD_LENGTHS)))
    return word.capitalize() if capitalized else word


SENTENCE_LIKE_PROB = 0.5  # share of training case inputs shaped like everyday sentences (`sentence_like`)


def sentence_like(rng: random.Random) -> list[str]:
    """3 to 8 random letter strings shaped like an everyday sentence: mostly short words (one to four letters, as
    `a`, `my`, `the`, `soup`), some longer, and words that come back (`the ... the`), so that a model has to keep its
    place in the sentence by position, not by recognising the word it is at. No real word is drawn."""
    words: list[str] = []
    for _ in range(rng.randint(3, 8)):
        if words and rng.random() < 0.2:
            words.append(rng.choice(words))
            continue
        while True:
            length = rng.randint(1, 4) if rng.random() < 0.6 else rng.randint(5, 10)
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
            if word not in _held_out_words():
                words.append(word)
                break
    return words


@functools.cache
def _held_out_words() -> frozenset[str]:
    """Every word a held-out split can show: the test part of each pool, the outside pools and sentences."""
    words = [w for pool in POOLS.values() for w in split_pool(pool, "test")]
    words += [w for pool in OUTSIDE_POOLS.values() for w in pool] + " ".join(OUTSIDE_SENTENCES).split()
    return frozenset(w.lower() for w in words)


def pick(rng: random.Random, pool: str, split: str, exclude: Iterable[str] = ()) -> str:
    """A value of `split` for a word slot drawn from `POOLS[pool]`. Training draws a random letter string most of
    the time, so a small model cannot get by on memorising the pool and must learn to copy; test values are held-out
    real words of the pool, "outside" values come from `OUTSIDE_POOLS` (no generator draws them otherwise)."""
    exclude, values = set(exclude), POOLS[pool]
    if split == "outside":
        return rng.choice([v for v in OUTSIDE_POOLS[pool] if v not in exclude])
    if split == "train" and rng.random() < PSEUDO_WORD_PROB:
        reserved = set(split_pool(values, "test")) | set(OUTSIDE_POOLS[pool])
        while True:
            word = pseudo_word(rng, capitalized=values[0][:1].isupper())
            if word not in exclude and word not in reserved:
                return word
    return rng.choice([v for v in split_pool(values, split) if v not in exclude])


def word_boundary(text: str, k: int) -> int:
    """Character offset where an update at word index k lands: after word k-1, before its space."""
    if k <= 0:
        return 0
    words = text.split(" ")
    return len(" ".join(words[:k])) if k < len(words) else len(text)


LANDINGS = ("before_space", "after_space", "in_word")  # where in the text an update can land (SPEC section 4)


def landing_shifts(response: str, k: int) -> dict[str, list[int]]:
    """Where an update that applies from word k can land, per landing kind, as character shifts from
    `word_boundary(response, k)`: 0 before the space that ends word k-1, +1 after it, -j inside word k-1 (j
    characters before its end; the word in progress is finished, then the update applies). Before the first word
    there is only one place."""
    if k <= 0:
        return {"before_space": [0]}
    shifts = {"before_space": [0], "after_space": [1]}
    inside = list(range(-(len(response.split(" ")[k - 1]) - 1), 0))
    if inside:
        shifts["in_word"] = inside
    return shifts


def landing_kind(shift: int) -> str:
    """The landing kind of a shift from the word boundary (see `landing_shifts`)."""
    return "before_space" if shift == 0 else "after_space" if shift > 0 else "in_word"


@dataclass(frozen=True)
class TaskUpdate:
    """One mid-stream update: applies from response word `word_index` on, and lands `shift` characters from that
    word's boundary (0: before the space that ends the previous word; +1: after it; negative: inside the previous
    word, which is finished as it would have been)."""

    word_index: int
    text: str
    kind: str  # "correction" | "distractor"
    shift: int = 0


@dataclass
class Instance:
    """One task instance: prompt, no-update answer, oracle answer with all updates applied."""

    family: str
    instruction: str
    prompt: str
    original_response: str
    response: str
    updates: list[TaskUpdate]
    invalidated: list[str]
    meta: dict[str, Any] = field(default_factory=dict)  # family params + update values (JSON-able)
    change_offsets: list[int] = field(default_factory=list)  # per update: see TaskFamily.change_offsets

    def words(self) -> list[str]:
        """Response words (space separated)."""
        return self.response.split(" ")

    def segments(self) -> list[str]:
        """Response cut where every update lands; "".join(segments()) == response."""
        cuts = [word_boundary(self.response, u.word_index) + u.shift for u in self.updates]
        edges = [0, *cuts, len(self.response)]
        return [self.response[a:b] for a, b in itertools.pairwise(edges)]

    @property
    def has_correction(self) -> bool:
        """True if at least one update is a correction (not a distractor)."""
        return any(u.kind == "correction" for u in self.updates)


class _Invalid(Exception):
    """An update that cannot apply at this position (e.g. a stop behind the current number)."""


class TaskFamily:
    """Base class: subclasses define params, the word emitter, updates and their phrasings."""

    name: str = ""
    phrasings: tuple[str, ...] = ()  # first one is the canonical phrasing; "{v}" is the new value
    landings: tuple[str, ...] = LANDINGS  # where in its answers an update can land

    # ---- family hooks -------------------------------------------------------------------
    def _params(self, rng: random.Random, split: str) -> dict:
        raise NotImplementedError

    def _instruction(self, p: dict) -> str:
        raise NotImplementedError

    def _start(self, p: dict) -> dict:
        raise NotImplementedError

    def _emit(self, p: dict, state: dict, i: int) -> str | None:
        """Word i of the response in `state`, or None when the response ends."""
        raise NotImplementedError

    def _apply(self, p: dict, state: dict, value: Any, i: int) -> None:
        """Change `state` for a correction landing before word i (raise _Invalid if impossible)."""
        raise NotImplementedError

    def _value(self, rng: random.Random, split: str, p: dict, prev: list) -> Any:
        """Draw a correction value differing from the original and all previous ones."""
        raise NotImplementedError

    def _split_key(self, p: dict, values: list) -> str | None:
        """Key hashed into train/test for families without per-value pools (None: pools do it)."""
        return None

    def _superseded(self, p: dict, edits: list[tuple[int, Any]]) -> set[str]:
        """Tokens the superseded versions (each prefix of the corrections) used after the first
        update's boundary; the oracle's own post-boundary tokens are removed by the caller."""
        k0 = edits[0][0]
        return {t for j in range(len(edits)) for t in tokens(" ".join(self._render(p, edits[:j])[k0:]))}

    def _templates(self, value: Any) -> Sequence[str]:
        return self.phrasings

    def _fmt(self, value: Any) -> dict:
        return {"v": value}

    def _correct(self, inst: Instance, generated: str) -> bool:
        return generated == inst.response

    def _corrected_params(self, p: dict, value: Any) -> dict:
        """The params of the question a correction turns the instruction into (families whose corrections can be
        asked as a question of their own)."""
        raise NotImplementedError(f"{self.name}: a correction does not rewrite the instruction")

    # ---- generic machinery --------------------------------------------------------------
    def _render(self, p: dict, edits: list[tuple[int, Any]]) -> list[str] | None:
        """Response words with corrections (word_index, value) applied; None if one is invalid."""
        state, out, pending = self._start(p), [], list(edits)
        try:
            for i in itertools.count():
                while pending and pending[0][0] == i:
                    self._apply(p, state, pending.pop(0)[1], i)
                word = self._emit(p, state, i)
                if word is None:
                    break
                out.append(word)
        except _Invalid:
            return None
        return None if pending else out

    def _resolve(self, p: dict, edits: list[tuple[int, Any]]) -> list[str] | None:
        """Words after all corrections, or None unless each lands inside the current response,
        at a non-decreasing index, and changes what follows it (and the result the original)."""
        original = prev = self._render(p, [])
        for j, (k, _) in enumerate(edits):
            if not 0 <= k < len(prev) or (j and k < edits[j - 1][0]):
                return None
            words = self._render(p, edits[: j + 1])
            if words is None or words[k:] == prev[k:]:
                return None
            prev = words
        return None if prev == original else prev  # e.g. case flipped back at the same word

    def _update_text(self, value: Any, rng: random.Random, canonical: bool) -> str:
        options = self._templates(value)
        return (options[0] if canonical else rng.choice(options)).format(**self._fmt(value))

    def _build(self, p: dict, values: list, updates: list[TaskUpdate]) -> Instance:
        """Assemble an Instance; invalidated = superseded tokens the oracle never uses after
        the first update (so the oracle itself is never a contradiction)."""
        instruction = self._instruction(p)
        original = self._render(p, [])
        edits = [(u.word_index, v) for u, v in zip(updates, values, strict=True)] if values else []
        words = self._resolve(p, edits) if edits else original
        if words is None:
            raise ValueError(f"{self.name}: updates {edits} are not valid for {instruction!r}")
        invalid = self._superseded(p, edits) - set(tokens(" ".join(words[edits[0][0] :]))) if edits else set()
        response = " ".join(words)
        return Instance(
            family=self.name,
            instruction=instruction,
            prompt=instruction + "\n",
            original_response=" ".join(original),
            response=response,
            updates=list(updates),
            invalidated=sorted(invalid),
            meta={"params": p, "values": list(values)},
            change_offsets=self.change_offsets(p, edits, response) if edits else [-1] * len(updates),
        )

    def change_offsets(self, p: dict, edits: list[tuple[int, Any]], response: str) -> list[int]:
        """Per correction, the character of `response` where it first changes what is written: the one token the
        model must get right for the correction to land (often the first letter of a new word; for a new stop, the
        end of the answer, len(response)). -1 where a later correction lands before that change shows."""
        cuts = [word_boundary(response, k) for k, _ in edits[1:]] + [len(response) + 1]
        offsets, before = [], " ".join(self._render(p, []))
        for j, (k, _) in enumerate(edits):
            after = " ".join(self._render(p, edits[: j + 1]))
            start = word_boundary(after, k)
            offset = next(
                (i for i in range(start, min(len(before), len(after))) if before[i] != after[i]),
                min(len(before), len(after)),
            )
            offsets.append(offset if offset < cuts[j] else -1)
            before = after
        return offsets

    def sample(
        self,
        rng: random.Random,
        split: str = "train",
        n_updates: int = 1,
        distractor: bool = False,
        word_index: int | None = None,
        canonical: bool = True,
        backchannels: Sequence[str] | None = None,
        landing: str = "before_space",
    ) -> Instance:
        """Draw one instance. Values are drawn before the first update's position, so the same
        seed with different `word_index` gives the same values; an invalid index raises ValueError.
        `landing`: where in the text each update lands (one of LANDINGS, or "any": drawn per update among the kinds
        its position allows)."""
        if landing not in (*self.landings, "any"):
            raise ValueError(f"`landing` must be one of {self.landings} or 'any' for {self.name}, got {landing!r}")
        in_split("", split)  # validates the split name
        for _ in range(1000):
            p = self._params(rng, split)
            values: list = []
            updates: list[TaskUpdate] = []
            edits: list[tuple[int, Any]] = []
            words = self._render(p, [])
            for j in range(n_updates):
                if distractor:
                    pool = backchannels or (DISTRACTORS if canonical else DISTRACTORS + EXTRA_DISTRACTORS)
                    text = rng.choice(pool)
                else:
                    values.append(self._value(rng, split, p, values))
                    text = self._update_text(values[-1], rng, canonical)
                if j == n_updates - 1 and not self._key_ok(p, values, split):
                    break
                lo = updates[-1].word_index if updates else 0
                if distractor:
                    ks = list(range(lo, len(words)))
                else:
                    ks = [k for k in range(lo, len(words)) if self._resolve(p, [*edits, (k, values[-1])])]
                if landing not in ("before_space", "any"):  # only words it can land inside or after
                    ks = [k for k in ks if landing in landing_shifts(" ".join(words), k)]
                if j == 0 and word_index is not None:
                    if word_index not in ks:
                        raise ValueError(f"{self.name}: no valid update at word {word_index} (valid: {ks})")
                    k = word_index
                elif not ks:
                    break
                else:  # prefer a strictly later position for a later update
                    k = rng.choice([i for i in ks if not updates or i > lo] or ks)
                shift = 0  # before the space (no draw: the instances of earlier versions stay as they were)
                if landing != "before_space":
                    shifts = landing_shifts(" ".join(words), k)  # the words before k are as they are written
                    kinds = sorted(kind for kind in shifts if kind in self.landings)
                    shift = rng.choice(shifts[rng.choice(kinds) if landing == "any" else landing])
                if updates and updates[-1].word_index == k:  # two at the same word: in the order they land
                    shift = max(shift, updates[-1].shift)
                updates.append(TaskUpdate(k, text, "distractor" if distractor else "correction", shift))
                if not distractor:
                    edits.append((k, values[-1]))
                    words = self._render(p, edits)
            else:
                if n_updates == 0 and not self._key_ok(p, values, split):
                    continue
                return self._build(p, values, updates)
        raise RuntimeError(f"{self.name}: could not sample an instance")

    def _key_ok(self, p: dict, values: list, split: str) -> bool:
        key = self._split_key(p, values)
        return key is None or in_split(key, split)

    def word_indices(self, inst: Instance) -> list[int]:
        """Word indices where the instance's first update could land instead (position sweep)."""
        return [k for k in range(len(inst.original_response.split(" "))) if self._moved(inst, k)]

    def _moved(self, inst: Instance, k: int, shift: int = 0) -> Instance | None:
        landings = [(k, shift)] + [(u.word_index, u.shift) for u in inst.updates[1:]]
        if not 0 <= k < len(inst.original_response.split(" ")) or any(b < a for a, b in itertools.pairwise(landings)):
            return None
        updates = [replace(u, word_index=i, shift=j) for u, (i, j) in zip(inst.updates, landings, strict=True)]
        try:
            moved = self._build(inst.meta["params"], inst.meta["values"], updates)
        except ValueError:
            return None
        allowed = landing_shifts(moved.response, k)
        return moved if shift in allowed.get(landing_kind(shift), []) else None

    def with_update_at(self, inst: Instance, k: int, shift: int = 0) -> Instance:
        """The same instance (same values and texts) with its first update moved to word k, landing `shift`
        characters from that word's boundary (`landing_shifts`)."""
        if not inst.updates:
            raise ValueError("instance has no update to move")
        moved = self._moved(inst, k, shift)
        if moved is None:
            raise ValueError(f"{self.name}: update cannot land at word {k} (shift {shift})")
        return moved

    def sweep(self, inst: Instance) -> list[Instance]:
        """The instance with its first update landing at every character of the response where it can land
        (before the space, after it, inside a word; every token of a byte-level tokenizer), in text order."""
        out = []
        for k in self.word_indices(inst):
            at_word = self.with_update_at(inst, k)
            shifts = sorted(j for js in landing_shifts(at_word.response, k).values() for j in js)
            out += [at_word if j == 0 else self.with_update_at(inst, k, j) for j in shifts]
        return out

    def instruction_after(self, inst: Instance, n: int) -> str:
        """The instruction as it reads with the instance's first `n` corrections applied (`Name 4 fruits.` +
        `Name animals instead.` -> `Name 4 animals.`): the question a corrected answer answers."""
        p = dict(inst.meta["params"])
        for value in inst.meta["values"][:n]:
            p = self._corrected_params(p, value)
        return self._instruction(p)

    def oracle_continuation(self, inst: Instance) -> str:
        """Oracle text after the first update's boundary (whole response if there is no update)."""
        k = inst.updates[0].word_index if inst.updates else 0
        return inst.response[word_boundary(inst.response, k) :]

    def score(self, inst: Instance, generated_response: str, landed: Sequence[int] | None = None) -> dict:
        """Score a generated response (stripped): exact/rule correctness, and whether it uses an
        invalidated value after the first update's boundary (whole-token, case-sensitive). `landed`: per update, the
        character of the generated text where it landed (a restart: 0), which the free-form families of chat models
        score from; exact-match families cut at the oracle's word boundary."""
        gen = generated_response.strip()
        k = inst.updates[0].word_index if inst.updates else 0
        post = gen[word_boundary(gen, k) :]
        bad = set(tokens(post)) & set(inst.invalidated)
        return {
            "correct": self._correct(inst, gen),
            "contradiction": inst.has_correction and bool(bad),
            "post": post,
            "oracle_post": self.oracle_continuation(inst),
        }


# ---- the seven families -----------------------------------------------------------------
class Count(TaskFamily):
    """`Count from a to b.`; `Stop at c.` moves the end (c >= the next number)."""

    name = "count"
    phrasings = ("Stop at {v}.", "Actually, stop at {v}.", "Only go up to {v}.", "Change it: stop at {v}.")

    def _params(self, rng, split):
        a = rng.randint(0, 99)
        return {"a": a, "b": a + rng.randint(3, 12) - 1}

    def _split_key(self, p, values):
        return f"count:{p['a']}:{p['b']}"

    def _instruction(self, p):
        return f"Count from {p['a']} to {p['b']}."

    def _start(self, p):
        return {"stop": p["b"]}

    def _emit(self, p, state, i):
        return str(p["a"] + i) if p["a"] + i <= state["stop"] else None

    def _apply(self, p, state, value, i):
        if value < p["a"] + i:
            raise _Invalid
        state["stop"] = value

    def _value(self, rng, split, p, prev):
        top = max([p["b"], *prev]) + 5
        return rng.choice([c for c in range(p["a"] + 1, top + 1) if c != p["b"] and c not in prev])


class Repeat(TaskFamily):
    """`Say w n times.`; `Say w2 instead.` replaces the remaining words, same total count."""

    name = "repeat"
    phrasings = ("Say {v} instead.", "Actually, say {v}.", "Use {v} instead.", "Switch to {v}.")

    def _params(self, rng, split):
        return {"w": pick(rng, "words", split), "n": rng.randint(3, 8)}

    def _instruction(self, p):
        return f"Say {p['w']} {p['n']} times."

    def _start(self, p):
        return {"w": p["w"]}

    def _emit(self, p, state, i):
        return state["w"] if i < p["n"] else None

    def _apply(self, p, state, value, i):
        state["w"] = value

    def _value(self, rng, split, p, prev):
        return pick(rng, "words", split, exclude=[p["w"], *prev])


class Spell(Repeat):
    """`Spell w.`; `Spell w2 instead.` continues with the whole spelling of w2."""

    name = "spell"
    phrasings = ("Spell {v} instead.", "Actually, spell {v}.", "Now spell {v}.", "Switch to spelling {v}.")
    landings = ("before_space", "after_space")  # its words are single letters: nothing lands inside one

    def _params(self, rng, split):
        return {"w": pick(rng, "words", split)}

    def _instruction(self, p):
        return f"Spell {p['w']}."

    def _start(self, p):
        return {"w": p["w"], "at": 0}

    def _emit(self, p, state, i):
        j = i - state["at"]
        return state["w"][j] if j < len(state["w"]) else None

    def _apply(self, p, state, value, i):
        state.update(w=value, at=i)


class Add(TaskFamily):
    """`Add k to each: x1 x2 ...`; `Add k2 instead.` applies k2 to the remaining items."""

    name = "add"
    phrasings = ("Add {v} instead.", "Actually, add {v}.", "Use {v} instead.", "Change the number to {v}.")

    def _params(self, rng, split):
        return {"k": rng.randint(1, 9), "xs": [rng.randint(0, 20) for _ in range(rng.randint(3, 6))]}

    def _split_key(self, p, values):
        return f"add:{p['k']}:{p['xs']}"

    def _instruction(self, p):
        return f"Add {p['k']} to each: " + " ".join(map(str, p["xs"]))

    def _start(self, p):
        return {"k": p["k"]}

    def _emit(self, p, state, i):
        return str(p["xs"][i] + state["k"]) if i < len(p["xs"]) else None

    def _apply(self, p, state, value, i):
        state["k"] = value

    def _value(self, rng, split, p, prev):
        return rng.choice([k for k in range(1, 10) if k != p["k"] and k not in prev])


class ListFamily(TaskFamily):
    """`Name n fruits.` -> distinct members, comma separated; `Name animals instead.` switches
    category. The oracle picks members in a fixed order per category (so the prompt determines the
    answer and it can be learnt); scoring accepts any valid picks."""

    name = "list"
    phrasings = ("Name {v} instead.", "Actually, name {v}.", "Switch to {v}.", "Make it {v} instead.")
    categories: ClassVar[dict[str, list[str]]] = CATEGORIES

    def _params(self, rng, split):
        return {"cat": rng.choice(list(CATEGORIES)), "n": rng.randint(3, 6)}

    def _split_key(self, p, values):
        return "list:" + "|".join([str(p["n"]), p["cat"], *values])

    def _instruction(self, p):
        return f"Name {p['n']} {p['cat']}."

    def _start(self, p):
        return {"cat": p["cat"], "used": 0}

    def _emit(self, p, state, i):
        if i >= p["n"]:
            return None
        word = self.categories[state["cat"]][state["used"]]
        state["used"] += 1
        return word + ("," if i < p["n"] - 1 else "")

    def _apply(self, p, state, value, i):
        state.update(cat=value, used=0)

    def _corrected_params(self, p, value):
        return dict(p, cat=value)

    def _value(self, rng, split, p, prev):
        return rng.choice([c for c in CATEGORIES if c != p["cat"] and c not in prev])

    def _superseded(self, p, edits):
        """Only the original category is wrong everywhere after the first update (the oracle's
        picks from later categories are just one valid choice)."""
        return set(self.categories[p["cat"]])

    def _correct(self, inst, generated):
        """The rule: right count, all distinct, each item a member of the category the
        oracle uses at that position (the original one before the update), `a, b, c` format."""
        items, oracle = generated.split(", "), inst.response.split(", ")
        category = {m: c for c, ms in CATEGORIES.items() for m in ms}
        return (
            len(items) == len(oracle)
            and len(set(items)) == len(items)
            and all(category.get(g) == category[o] for g, o in zip(items, oracle, strict=True))
        )


class Note(TaskFamily):
    """`Write to Anna about rain.` -> a fixed note; `The name is X.` / `The topic is Y.`
    changes every later mention."""

    name = "note"
    template = ("Dear {name}, this is about {topic}. More on {topic} soon, {name}. Bye.").split(" ")
    phrasing_sets: ClassVar[dict[str, list[str]]] = {
        "name": ["The name is {v}.", "Actually, the name is {v}.", "Change the name to {v}.", "Address it to {v}."],
        "topic": ["The topic is {v}.", "Actually, the topic is {v}.", "Change the topic to {v}.", "Make it about {v}."],
    }
    pools: ClassVar[dict[str, str]] = {"name": "names", "topic": "topics"}  # slot -> POOLS key

    def _params(self, rng, split):
        return {s: pick(rng, pool, split) for s, pool in self.pools.items()}

    def _instruction(self, p):
        return f"Write to {p['name']} about {p['topic']}."

    def _start(self, p):
        return dict(p)

    def _emit(self, p, state, i):
        return self.template[i].format(**state) if i < len(self.template) else None

    def _apply(self, p, state, value, i):
        state[value[0]] = value[1]

    def _corrected_params(self, p, value):
        return dict(p, **{value[0]: value[1]})

    def _value(self, rng, split, p, prev):
        slot = rng.choice(list(self.pools))
        used = {p[slot]} | {v for s, v in prev if s == slot}
        return [slot, pick(rng, self.pools[slot], split, exclude=used)]

    def _templates(self, value):
        return self.phrasing_sets[value[0]]

    def _fmt(self, value):
        return {"v": value[1]}


class Case(TaskFamily):
    """`Uppercase: the red fox` -> `THE RED FOX` (Lowercase: input in capitals);
    `Lowercase instead.` / `Uppercase instead.` recases the remaining words."""

    name = "case"
    phrasings = ("{v} instead.", "Actually, {l}.", "Switch to {l}.", "Make the rest {l}.")

    def _params(self, rng, split):
        case = rng.choice(["Uppercase", "Lowercase"])
        if split == "outside":  # everyday sentences, short function words included
            return {"case": case, "words": rng.choice(OUTSIDE_SENTENCES).split()}
        if split == "train" and rng.random() < SENTENCE_LIKE_PROB:
            return {"case": case, "words": sentence_like(rng)}
        words: list[str] = []
        for _ in range(rng.randint(3, 6)):
            words.append(pick(rng, "words", split, exclude=words))
        return {"case": case, "words": words}

    def _instruction(self, p):
        shown = [w.lower() if p["case"] == "Uppercase" else w.upper() for w in p["words"]]
        return f"{p['case']}: " + " ".join(shown)

    def _start(self, p):
        return {"case": p["case"]}

    def _emit(self, p, state, i):
        if i >= len(p["words"]):
            return None
        return p["words"][i].upper() if state["case"] == "Uppercase" else p["words"][i].lower()

    def _apply(self, p, state, value, i):
        state["case"] = value

    def _value(self, rng, split, p, prev):
        current = prev[-1] if prev else p["case"]
        return "Lowercase" if current == "Uppercase" else "Uppercase"

    def _fmt(self, value):
        return {"v": value, "l": value.lower()}


FAMILIES: dict[str, TaskFamily] = {f.name: f for f in (Count(), Repeat(), Spell(), Add(), ListFamily(), Note(), Case())}


# ---- free-form families for chat models ---------------------------------------------------
# A pretrained chat model answers in its own words and formats (`1. Bananas\n2. Apples`, `Dear Anna, I hope ...`).
# These families keep the state machines above for their oracles (training targets and landing points) and score
# by rules that accept every valid answer: any member of the category, in any list format, no fixed length; any text
# that names the new value after the correction landed and not the one it replaced.

# Category lexicons (singular, lowercase; `-` stands for a space). Training and the test split name
# ITEM_CATEGORIES; the outside split names categories no training row names.
CATEGORY_MEMBERS: dict[str, list[str]] = {  # the most common members first: the oracle names them in this order
    name: list(dict.fromkeys(words.split()))
    for name, words in {
        "fruits": """apple pear plum fig mango kiwi banana cherry grape lemon lime peach apricot orange strawberry
            blueberry raspberry blackberry pineapple watermelon melon papaya coconut pomegranate grapefruit avocado
            tangerine nectarine cranberry date guava lychee passionfruit persimmon quince olive currant""",
        "animals": """dog cat horse cow lion tiger elephant sheep goat pig zebra wolf bear fox rabbit giraffe monkey
            whale dolphin shark snake eagle owl deer mouse rat kangaroo koala panda penguin camel hippo hippopotamus
            rhino rhinoceros cheetah leopard gorilla chimpanzee squirrel bird fish frog turtle crocodile alligator
            donkey duck chicken hen goose parrot otter bat bee ant butterfly jaguar lizard hamster moose buffalo""",
        "colors": """red blue green yellow purple pink brown black white gray grey violet cyan orange magenta teal
            turquoise indigo maroon beige gold silver navy lavender crimson scarlet""",
        "tools": """hammer saw drill wrench pliers chisel shovel rake axe file level clamp screwdriver spanner mallet
            hoe trowel ruler tape scissors knife sander grinder crowbar vise pickaxe spade""",
        "vegetables": """carrot potato onion garlic pepper cabbage leek pea bean radish spinach broccoli cauliflower
            lettuce tomato cucumber celery zucchini eggplant asparagus kale corn beet beetroot pumpkin squash turnip
            artichoke sprout mushroom yam okra""",
        "instruments": """piano guitar violin flute drum harp trumpet cello oboe banjo tuba clarinet saxophone
            trombone viola bass ukulele harmonica accordion keyboard organ mandolin xylophone bagpipe""",
        "sports": """soccer basketball tennis baseball football golf hockey rugby boxing rowing skiing cricket
            volleyball swimming cycling running badminton wrestling surfing skating judo karate fencing archery
            diving sailing snowboarding gymnastics handball""",
        "drinks": """water tea coffee milk juice soda cocoa cider lemonade smoothie wine beer milkshake
            chocolate espresso latte cappuccino kombucha""",
        "birds": """eagle owl parrot sparrow pigeon crow robin hawk falcon swan duck goose penguin flamingo peacock
            ostrich hummingbird woodpecker seagull gull pelican heron stork crane raven magpie canary finch
            dove vulture kingfisher toucan chicken turkey jay bluejay bluebird parakeet cardinal blackbird
            starling swallow wren lark nightingale albatross cuckoo quail pheasant partridge oriole mockingbird
            puffin emu condor osprey kestrel buzzard thrush warbler cockatoo macaw budgie goldfinch egret ibis
            rooster""",
        "flowers": """rose tulip daisy lily sunflower orchid daffodil lavender violet poppy carnation peony iris
            marigold jasmine lotus hibiscus dandelion chrysanthemum magnolia hyacinth begonia geranium petunia
            azalea camellia gardenia hydrangea lilac gladiolus zinnia pansy aster anemone freesia bluebell
            buttercup snapdragon foxglove primrose crocus dahlia amaryllis lupine""",
        "vehicles": """car bus truck train bicycle bike motorcycle airplane plane boat ship helicopter van taxi
            tram scooter subway tractor ambulance jeep submarine yacht rocket sled sedan suv minivan pickup
            limousine convertible hatchback moped bulldozer forklift trolley wagon cart carriage canoe kayak ferry
            jet glider spaceship unicycle tricycle skateboard hovercraft lorry coach minibus firetruck cab""",
        "countries": """france germany italy spain japan china india brazil canada mexico russia australia egypt
            england greece portugal sweden norway kenya nigeria argentina chile peru turkey ireland poland
            netherlands belgium switzerland austria usa america
            united-states united-kingdom uk britain scotland wales new-zealand south-africa south-korea korea
            vietnam thailand indonesia philippines pakistan bangladesh iran iraq israel saudi-arabia morocco
            ethiopia ghana colombia venezuela cuba denmark finland iceland ukraine hungary romania singapore
            malaysia nepal""",
    }.items()
}
LEXICONS: dict[str, frozenset[str]] = {name: frozenset(words) for name, words in CATEGORY_MEMBERS.items()}
ITEM_CATEGORIES = ("fruits", "animals", "colors", "vegetables", "sports")  # what a 135M chat model lists well
OUTSIDE_CATEGORIES = ("birds", "flowers", "vehicles", "countries")
_LIST_MARKER = re.compile(r"^\s*(?:\d+\s*[.):]|[-*\u2022])\s*")
_ARTICLE = re.compile(r"^(?:and|or|a|an|the|some)\s+")


def list_items(text: str) -> list[str]:
    """The items of a list in whatever format a chat model writes it: one per line (numbered or bulleted), or
    separated by commas and `and`; a description after `:` or ` - ` is dropped. Lowercase, no end punctuation."""
    items = []
    for line in text.replace("*", "").split("\n"):
        line = re.sub(r"\([^)]*\)?", "", _LIST_MARKER.sub("", line))  # no numbering, no (asides)
        if _LIST_MARKER.match(line) is None and re.search(r":| - | \u2013 ", line) and text.count("\n"):
            line = re.split(r":| - | \u2013 ", line, maxsplit=1)[0]  # `Apples: sweet and crisp` -> `Apples`
        for part in re.split(r",|;|\band\b", line):
            item = _ARTICLE.sub("", part.strip().strip(".!?").strip().lower())
            if item:
                items.append(item)
    return items


_IRREGULAR_PLURALS = {"geese": "goose", "mice": "mouse", "knives": "knife", "oxen": "ox", "teeth": "tooth"}


def singular(word: str) -> str:
    """A plural noun's singular form, by English suffix rules (`cherries` -> `cherry`, `wolves` -> `wolf`)."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    for suffix, repl in (("ies", "y"), ("ves", "f"), ("oes", "o"), ("ses", "s"), ("xes", "x"), ("ches", "ch")):
        if word.endswith(suffix) and len(word) > len(suffix) + 1:
            return word[: -len(suffix)] + repl
    return word[:-1] if word.endswith("s") and not word.endswith("ss") and len(word) > 3 else word


def is_member(item: str, category: str) -> bool:
    """Whether a list item names a member of `category`: the item or its head (last word, as in `polar bear`,
    `green tea`), singular or plural; at most three words."""
    lexicon, words = LEXICONS[category], item.split()
    if not words or len(words) > 3:
        return False
    candidates = {item, item.replace(" ", "-"), words[-1], singular(words[-1]), singular(item)}
    return bool(candidates & lexicon) or (words[-1].endswith("ves") and words[-1][:-3] + "fe" in lexicon)


def mentions(text: str, value: str) -> bool:
    """Whether `text` names `value` as a whole word (any case; a topic also singular or plural), on its own or as a
    part of a possessive or a hyphenated compound (`the city's`, `table-making`)."""
    forms = {value.lower(), singular(value.lower()), value.lower() + "s"}
    words = [part for t in tokens(text) for part in {t, *re.split(r"['-]", t)}]
    return any(singular(w.lower()) in forms or w.lower() in forms for w in words)


class Items(ListFamily):
    """`Name n fruits.` answered as a chat model lists things (numbered lines, bullets or commas); `Name animals
    instead.` switches category. Right when every item after the last correction landed (up to the n asked for)
    names a member of the category it asked for, and at least one does; the items need not be the oracle's, nor n."""

    name = "items"
    categories: ClassVar[dict[str, list[str]]] = CATEGORY_MEMBERS
    landings = ("before_space", "after_space")  # an item is a word: nothing lands inside one

    @staticmethod
    def _pool(split: str) -> tuple[str, ...]:
        return OUTSIDE_CATEGORIES if split == "outside" else ITEM_CATEGORIES

    def _params(self, rng, split):
        return {"cat": rng.choice(self._pool(split)), "n": rng.randint(3, 6)}

    def _split_key(self, p, values):
        return None if p["cat"] in OUTSIDE_CATEGORIES else super()._split_key(p, values)

    def _value(self, rng, split, p, prev):
        return rng.choice([c for c in self._pool(split) if c != p["cat"] and c not in prev])

    def score(self, inst: Instance, generated_response: str, landed: Sequence[int] | None = None) -> dict:
        cats = [inst.meta["params"]["cat"], *inst.meta.get("values", [])]
        n = inst.meta["params"]["n"]
        cut = _past_word(generated_response, _landed(inst, landed, last=True))
        before, after = list_items(generated_response[:cut]), list_items(generated_response[cut:])
        asked = after[: max(1, n - len(before))]
        first = _past_word(generated_response, _landed(inst, landed, last=False))
        later = list_items(generated_response[first:]) if inst.has_correction else []
        return {
            "correct": bool(asked) and all(is_member(item, cats[-1]) for item in asked),
            "contradiction": any(is_member(i, cats[0]) and not is_member(i, cats[-1]) for i in later),
            "post": generated_response[first:],
            "oracle_post": self.oracle_continuation(inst),
        }


class Letter(Note):
    """`Write a short note to Anna about rain.` answered in a chat model's own words; `The name is Iris.` / `The
    topic is snow.` (the oracle starts the note again: `Dear Anna, this Dear Iris, this is about rain. ...`).
    Right when every changed slot's last value is named after the correction that set it landed, and no value is
    named after the correction that replaced it landed (between two corrections the first one's value is right: a
    note to Iris about snow may name Iris before `The topic is snow.` and snow after it; with no correction: names
    the addressee and the topic).
    """

    name = "letter"
    landings = ("before_space", "after_space")

    def _instruction(self, p):
        return f"Write a short note to {p['name']} about {p['topic']}."

    # a correction starts the note again with the new value, as a chat model corrected mid-answer does (the note's
    # next mention of the value may lie past the end of what it writes)
    def _start(self, p):
        return dict(p, at=0)

    def _emit(self, p, state, i):
        j = i - state["at"]
        return self.template[j].format(**state) if j < len(self.template) else None

    def _apply(self, p, state, value, i):
        state.update({value[0]: value[1], "at": i})

    def score(self, inst: Instance, generated_response: str, landed: Sequence[int] | None = None) -> dict:
        params, values = inst.meta["params"], [tuple(v) for v in inst.meta.get("values", [])]
        first = _landed(inst, landed, last=False)
        post = generated_response[first:]
        if not inst.has_correction:
            correct = all(mentions(generated_response, params[slot]) for slot in self.pools)
            return {"correct": correct, "contradiction": False, "post": post, "oracle_post": inst.response}
        final = dict(params) | dict(values)
        current, bad, named = dict(params), False, {}
        for (slot, value), cut in zip(values, _correction_landings(inst, landed), strict=True):
            after = _without_updates(inst, generated_response[cut:])
            if current[slot].lower() not in (value.lower(), final[slot].lower()):  # replaced here, for good
                bad = bad or mentions(after, current[slot])
            current[slot], named[slot] = value, mentions(after, value)  # the slot's last value, named once it landed
        return {
            "correct": all(named.values()) and not bad,
            "contradiction": bad,
            "post": post,
            "oracle_post": self.oracle_continuation(inst),
        }


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


class _HeldOutPhrasings:
    """A family whose held-out splits phrase corrections only in ways no training row does (`held_out_phrasings`;
    the first one is their canonical phrasing): the model must take a correction it was never shown."""

    held_out_phrasings: tuple[str, ...] = ()
    _split = "train"

    def sample(self, rng, split="train", *args, **kwargs):
        self._split = split
        try:
            return super().sample(rng, split, *args, **kwargs)
        finally:
            self._split = "train"

    def _templates(self, value):
        return self.phrasings if self._split == "train" else self.held_out_phrasings


class Stop(_HeldOutPhrasings, Items):
    """`Name 6 animals.` answered as a chat model lists things; `Stop after three.` cuts the list short (a count, or
    scope, correction). Right when the whole answer names exactly the number of members of the category that the
    last correction asked for, in any list format (a lead-in or a closing line is not an item of the category)."""

    name = "stop"
    phrasings = ("Stop after {w}.", "Only {w}, please.", "Just {w} is enough.", "Make it {w} instead.")
    held_out_phrasings = ("That's enough after {w}.", "Cut it to {w}.", "I only need {w}.", "Keep it to {w}.")

    def _params(self, rng, split):
        return {"cat": rng.choice(self._pool(split)), "n": rng.randint(4, 7)}

    def _split_key(self, p, values):
        return None if p["cat"] in OUTSIDE_CATEGORIES else "stop:" + "|".join(map(str, [p["cat"], p["n"], *values]))

    def _instruction(self, p):
        return f"Name {p['n']} {p['cat']}."

    def _start(self, p):
        return {"cat": p["cat"], "used": 0, "n": p["n"]}

    def _emit(self, p, state, i):
        if i >= state["n"]:
            return None
        word = self.categories[state["cat"]][state["used"]]
        state["used"] += 1
        return word + ("," if i < state["n"] - 1 else "")

    def _apply(self, p, state, value, i):
        if value <= i:  # the list already holds more items than the correction asks for
            raise _Invalid
        state["n"] = value

    def _corrected_params(self, p, value):
        return dict(p, n=value)

    def _value(self, rng, split, p, prev):
        current = prev[-1] if prev else p["n"]
        return rng.choice([v for v in range(2, p["n"]) if v != current and v not in prev])

    def _superseded(self, p, edits):
        return set()  # the answer's words stay valid; only its length changes

    def _fmt(self, value):
        return {"w": NUMBER_WORDS[value], "v": value}

    def score(self, inst: Instance, generated_response: str, landed: Sequence[int] | None = None) -> dict:
        cat = inst.meta["params"]["cat"]
        wanted = ([inst.meta["params"]["n"], *inst.meta.get("values", [])])[-1]
        members = [  # (`horses`: the suffix rules make `hors`; a plain `-s` plural is tried too)
            item
            for item in list_items(generated_response)
            if is_member(item, cat) or (item.endswith("s") and is_member(item[:-1], cat))
        ]
        first = _past_word(generated_response, _landed(inst, landed, last=False)) if inst.has_correction else 0
        return {
            "correct": len(members) == wanted,
            "contradiction": inst.has_correction and len(members) > wanted,
            "post": generated_response[first:],
            "oracle_post": self.oracle_continuation(inst),
        }


class _OneSentence(_HeldOutPhrasings, TaskFamily):
    """`Write one sentence about rain.`, answered in a chat model's own words; the oracle's sentence is `template`."""

    landings = ("before_space", "after_space")
    template = "I think {topic} is a lovely thing, and many people enjoy it every day.".split(" ")

    def _params(self, rng, split):
        return {"topic": pick(rng, "topics", split)}

    def _instruction(self, p):
        return f"Write one sentence about {p['topic']}."


class Include(_OneSentence):
    """`Write one sentence about rain.` answered in a chat model's own words; `Use the word lantern.` asks for a word
    it must use from then on (a required word). Right when the text after the last correction landed (the correction
    repeated back does not count) uses the word the last correction asked for (any case, singular or plural); with
    no correction, when the answer names the topic."""

    name = "include"
    phrasings = ("Use the word {v}.", "Include the word {v}.", "Mention {v} too.", "Put the word {v} in it.")
    held_out_phrasings = ("Work in the word {v}.", "Make sure it says {v}.", "Add {v} to it.", "Say {v} somewhere.")

    def _start(self, p):
        return {"word": None, "at": None}

    def _emit(self, p, state, i):
        if state["word"] is None:
            return self.template[i].format(**p) if i < len(self.template) else None
        tail = f"with a {state['word']} too.".split(" ")  # the oracle works the word in where it was asked for
        j = i - state["at"]
        return tail[j] if 0 <= j < len(tail) else None

    def _apply(self, p, state, value, i):
        state.update(word=value, at=i)

    def _corrected_params(self, p, value):
        return dict(p, word=value)

    def _instruction_with_word(self, p):
        return f"Write one sentence about {p['topic']}. Use the word {p['word']}."

    def instruction_after(self, inst: Instance, n: int) -> str:
        values = inst.meta["values"][:n]
        return (
            self._instruction(inst.meta["params"])
            if not values
            else self._instruction_with_word(dict(inst.meta["params"], word=values[-1]))
        )

    def _value(self, rng, split, p, prev):
        return pick(rng, "words", split, exclude=[p["topic"], *prev])

    def _superseded(self, p, edits):
        return set()  # nothing the answer wrote becomes wrong

    def score(self, inst: Instance, generated_response: str, landed: Sequence[int] | None = None) -> dict:
        post = generated_response[_landed(inst, landed, last=False) :]
        if not inst.has_correction:
            return _names_topic(inst, generated_response, post)
        tail = _without_updates(inst, generated_response[_landed(inst, landed, last=True) :])
        return {
            "correct": mentions(tail, inst.meta["values"][-1]),
            "contradiction": False,
            "post": post,
            "oracle_post": self.oracle_continuation(inst),
        }


class Topic(_OneSentence):
    """`Write one sentence about rain.` answered in a chat model's own words; `Make it about cats instead.` switches
    the topic. Right when the text after the last correction landed (the correction repeated back does not count)
    names the new topic and the text after the first correction no replaced topic (any case, singular or plural);
    with no correction, when the answer names the topic."""

    name = "topic"
    phrasings = ("Make it about {v} instead.", "Actually, write about {v}.", "Switch to {v}.", "Change it to {v}.")
    held_out_phrasings = ("Talk about {v} instead.", "Let's do {v} instead.", "No, {v}.", "Write about {v} instead.")

    def _start(self, p):
        return {"topic": p["topic"], "at": 0}

    def _emit(self, p, state, i):  # a correction starts the sentence again about the new topic
        j = i - state["at"]
        return self.template[j].format(**state) if j < len(self.template) else None

    def _apply(self, p, state, value, i):
        state.update(topic=value, at=i)

    def _corrected_params(self, p, value):
        return dict(p, topic=value)

    def _value(self, rng, split, p, prev):
        return pick(rng, "topics", split, exclude=[p["topic"], *prev])

    def _superseded(self, p, edits):
        return {p["topic"], *(v for _, v in edits[:-1])}

    def score(self, inst: Instance, generated_response: str, landed: Sequence[int] | None = None) -> dict:
        topics = [inst.meta["params"]["topic"], *inst.meta.get("values", [])]
        post = generated_response[_landed(inst, landed, last=False) :]
        if not inst.has_correction:
            return _names_topic(inst, generated_response, post)
        post = _without_updates(inst, post)
        tail = _without_updates(inst, generated_response[_landed(inst, landed, last=True) :])
        replaced = [t for t in topics[:-1] if t.lower() != topics[-1].lower()]  # (between two corrections: fine)
        bad = mentions(post, topics[0]) if topics[0] in replaced else False
        bad = bad or any(mentions(tail, t) for t in replaced)
        return {
            "correct": mentions(tail, topics[-1]) and not bad,
            "contradiction": bad,
            "post": post,
            "oracle_post": self.oracle_continuation(inst),
        }


def _without_updates(inst: Instance, text: str) -> str:
    """`text` without the updates' own words (any case): repeating a correction back is not following it."""
    for update in inst.updates:
        text = re.sub(re.escape(update.text), "", text, flags=re.IGNORECASE)
    return text


def _names_topic(inst: Instance, generated_response: str, post: str) -> dict:
    """The score of an answer with no correction: right when it names the topic it was asked about."""
    correct = mentions(generated_response, inst.meta["params"]["topic"])
    return {"correct": correct, "contradiction": False, "post": post, "oracle_post": inst.response}


def _landings(inst: Instance, landed: Sequence[int] | None) -> list[int]:
    """Character of the generated text where each update landed: `landed`, or the oracle's own cuts where it is not
    given."""
    return list(landed) if landed is not None else list(itertools.accumulate(len(s) for s in inst.segments()[:-1]))


def _landed(inst: Instance, landed: Sequence[int] | None, last: bool) -> int:
    """Character of the generated text where the first (or the last) update landed."""
    cuts = _landings(inst, landed)
    return (cuts[-1] if last else cuts[0]) if cuts else 0


def _correction_landings(inst: Instance, landed: Sequence[int] | None) -> list[int]:
    """Character of the generated text where each correction landed (backchannels left out)."""
    cuts = _landings(inst, landed)
    return [cut for cut, update in zip(cuts, inst.updates, strict=False) if update.kind == "correction"]


def _past_word(text: str, cut: int) -> int:
    """`cut` moved past the rest of a word it lies inside: the word in progress is finished as it would have been."""
    while 0 < cut < len(text) and text[cut - 1].isalnum() and text[cut].isalnum():
        cut += 1
    return cut


CHAT_FAMILIES: dict[str, TaskFamily] = {f.name: f for f in (Items(), Letter(), Stop(), Include(), Topic())}


def get_family(name: str) -> TaskFamily:
    """Family by name, with a clear error for unknown names."""
    known = FAMILIES | CHAT_FAMILIES
    if name not in known:
        raise KeyError(f"unknown task family {name!r}; known: {list(known)}")
    return known[name]
