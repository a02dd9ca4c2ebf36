"""Malformed updates are refused before decoding, with a TypeError/ValueError that names what is wrong."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data import build_byte_tokenizer
from generation_duplex import DuplexUpdate, UpdateStream
from updates_duplex import normalize_updates

TOK = build_byte_tokenizer()
VOCAB = 258

good_at = st.integers(0, 50)
good_payload = st.one_of(
    st.text(alphabet="abcdefgh .", min_size=1, max_size=8).filter(str.strip),
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5),
)
not_an_int = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=3))

# (malformed update, words the error must contain)
bad_at = st.one_of(
    st.tuples(st.integers(max_value=-1), good_payload).map(lambda u: (u, "`at` must be a non-negative int")),
    st.tuples(not_an_int, good_payload).map(lambda u: (u, "`at` must be an int")),
)
bad_payload = st.one_of(
    st.tuples(good_at, st.one_of(st.none(), st.integers(), st.floats(), st.dictionaries(st.text(), st.text()))).map(
        lambda u: (u, "an update is text or a list of token ids")
    ),
    st.tuples(good_at, st.sampled_from(["", " ", "\n\t"])).map(lambda u: (u, "text is empty")),
    st.tuples(good_at, st.sampled_from([[], ()])).map(lambda u: (u, "token ids are empty")),
    st.tuples(good_at, st.lists(st.integers(VOCAB, 10**6), min_size=1, max_size=3)).map(
        lambda u: (u, "outside the vocabulary")
    ),
    st.tuples(good_at, st.lists(st.integers(max_value=-1), min_size=1, max_size=3)).map(
        lambda u: (u, "outside the vocabulary")
    ),
    st.tuples(good_at, st.lists(st.one_of(st.text(max_size=2), st.floats(), st.none()), min_size=1, max_size=3)).map(
        lambda u: (u, "token ids must be ints")
    ),
)
bad_shape = st.one_of(
    st.tuples(good_at).map(lambda u: (u, "an update has 2 items, got 1")),
    st.tuples(good_at, good_payload, good_payload).map(lambda u: (u, "an update has 2 items, got 3")),
    st.one_of(st.integers(), st.text(max_size=4), st.none()).map(lambda u: (u, "cannot read")),
)
malformed = st.one_of(bad_at, bad_payload, bad_shape)


@settings(max_examples=300, deadline=None)
@given(case=malformed, before=st.lists(st.tuples(good_at, good_payload), max_size=2))
def test_a_malformed_update_is_refused_naming_it(case, before):
    """Whatever is wrong with one update in a list, generate's reading of `updates` refuses it and says what."""
    update, message = case
    with pytest.raises((TypeError, ValueError), match="`updates`") as error:
        normalize_updates([*before, update], batch_size=1, tokenizer=TOK, vocab_size=VOCAB)
    assert message in str(error.value)
    assert f"item {len(before)}" in str(error.value)


@settings(max_examples=200, deadline=None)
@given(updates=st.lists(st.tuples(good_at, good_payload), max_size=4))
def test_well_formed_updates_are_read_as_given(updates):
    (row,) = normalize_updates(updates, batch_size=1, tokenizer=TOK, vocab_size=VOCAB)
    assert [p.at for p in row] == sorted(at for at, _ in updates)
    for at, payload in updates:
        ids = TOK(payload, add_special_tokens=False).input_ids if isinstance(payload, str) else list(payload)
        assert any(p.at == at and p.token_ids == ids for p in row)


@pytest.mark.parametrize(
    ("updates", "error", "message"),
    [
        ((8, "Stop at 5."), TypeError, r"single update, not a list of them: pass \[\(8, 'Stop at 5.'\)\]"),
        ("Stop at 5.", TypeError, "must be None, a list of updates or an UpdateStream"),
        ([(2, 12)], TypeError, r"\(2, 12\).*got int 12"),
        ([(8, None)], TypeError, r"\(8, None\).*got NoneType"),
        ([(2, torch.tensor([[1, 2]]))], ValueError, r"1-D tensor, got shape \(1, 2\)"),
        ([(2, torch.tensor([1.0]))], TypeError, "integer tensor"),
        ([DuplexUpdate(2)], ValueError, "exactly one of `text` and `token_ids`"),
        ([DuplexUpdate(2, text="a", token_ids=(1,))], ValueError, "exactly one of"),
        ([(2, "a"), [(3, "b")]], TypeError, r"item 1 .*cannot read list"),
    ],
)
def test_the_issue_examples_name_what_is_wrong(updates, error, message):
    with pytest.raises(error, match=message):
        normalize_updates(updates, batch_size=1, tokenizer=TOK, vocab_size=VOCAB)


@settings(max_examples=100, deadline=None)
@given(
    payload=st.one_of(
        st.integers(), st.none(), st.floats(), st.sampled_from(["", "  ", [], ()]), st.lists(st.text(), min_size=1)
    )
)
def test_stream_put_refuses_what_is_not_text_or_token_ids(payload):
    with pytest.raises((TypeError, ValueError), match=r"UpdateStream\.put"):
        UpdateStream().put(payload)


@pytest.mark.parametrize(("row", "error"), [(-1, ValueError), ("0", TypeError), (True, TypeError), (1.0, TypeError)])
def test_stream_put_refuses_a_bad_row(row, error):
    with pytest.raises(error, match="`row`"):
        UpdateStream().put("Stop at 5.", row=row)
