"""Byte-level tokenizer for the offline default: one token per UTF-8 byte (ids 0-255 = bytes)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Every turn is its text and a newline: a user turn renders as the prompt format the tasks speak
# ("Count from 3 to 9." -> "Count from 3 to 9.\n"), and a follow-up turn as the restart prompt
# `{instruction}\n{correction}\n`.
CHAT_TEMPLATE = "{%- for message in messages %}{{ message['content'] }}\n{% endfor %}"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def build_byte_tokenizer(model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """A 258-token byte-level tokenizer: 256 bytes, then `<|endoftext|>` (eos, 256) and
    `<|pad|>` (pad, 257); no BOS and nothing added by add_special_tokens; pads on the left, as generation needs.
    Its chat template (`CHAT_TEMPLATE`) is saved with it (`chat_template.jinja`)."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # decoder-only generation: a batch's prompts end where their answers begin
        chat_template=CHAT_TEMPLATE,
    )
