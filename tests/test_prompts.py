"""Prompt formats: plain text for the byte-level backbone, a chat model's own template (with few-shot examples)
otherwise; training and evaluation render a row the same way."""

import json
import re

import pytest
from transformers import Qwen3ForCausalLM

import train_duplex
from backbone_shapes import backbone_config
from data import FAMILIES, build_byte_tokenizer, build_dataset, tokens
from data.collate import encode, tokenize_row
from data.prompts import PromptFormat, _known_words

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer():
    """The byte-level tokenizer with a ChatML template (a stand-in for SmolLM2-Instruct's)."""
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def one_row_per_family(seed: int = 0) -> list[dict]:
    return list(build_dataset("test", len(FAMILIES), seed, mix={"one": 1.0}))


def test_plain_format_is_the_rows_own_text():
    fmt = PromptFormat.for_tokenizer(build_byte_tokenizer())  # no chat template: plain text
    assert not fmt.chat and fmt.inband_template == "\n{text}\n"
    with pytest.raises(ValueError, match="shots=3"):
        PromptFormat.for_tokenizer(build_byte_tokenizer(), shots=3)
    for row in one_row_per_family():
        assert fmt.prompt(row["family"], row["instruction"]) == row["prompt"]
        restart = fmt.restart_prompt(row["family"], row["instruction"], row["update_texts"])
        assert restart == f"{row['instruction']}\n{row['update_texts'][0]}\n"


def test_inband_correction_is_a_user_turn_mid_answer_as_the_chat_template_writes_it():
    tokenizer = chat_tokenizer()
    fmt = PromptFormat.for_tokenizer(tokenizer)
    for row in one_row_per_family():
        before, after = row["segments"]
        spliced = fmt.prompt(row["family"], row["instruction"]) + before
        spliced += fmt.inband_template.replace("{text}", row["update_texts"][0]) + after + "<|im_end|>\n"
        conversation = [
            {"role": "user", "content": row["instruction"]},
            {"role": "assistant", "content": before},
            {"role": "user", "content": row["update_texts"][0]},
            {"role": "assistant", "content": after},
        ]
        assert spliced == tokenizer.apply_chat_template(conversation, tokenize=False)


def test_few_shot_examples_are_fixed_per_family_and_made_of_real_words():
    fmt = PromptFormat.for_tokenizer(chat_tokenizer(), shots=3)
    prompts = {}
    for family in FAMILIES:
        prompt = fmt.prompt(family, "QUESTION")
        assert prompt == PromptFormat.for_tokenizer(chat_tokenizer(), shots=3).prompt(family, "QUESTION")
        assert prompt.count("<|im_start|>user") == 3 + 1 + 1  # three examples, the last one corrected mid-answer
        text = re.sub(r"<\|im_start\|>(user|assistant)|<\|im_end\|>|QUESTION", " ", prompt)
        words = [t for t in tokens(text) if len(t) > 1 and not t.isdigit()]
        assert words and all(w.lower() in _known_words() for w in words), words
        restart = fmt.restart_prompt(family, "QUESTION", ["CORRECTION"])
        assert restart.count("<|im_start|>user") == 3 + 1  # three corrected-from-the-start examples, the question
        assert restart.endswith("QUESTION\nCORRECTION<|im_end|>\n<|im_start|>assistant\n")
        prompts[family] = prompt
    assert len(set(prompts.values())) == len(FAMILIES)


def test_duplex_rows_in_chat_format_carry_the_correction_turn_to_the_workspace():
    tokenizer = chat_tokenizer()
    fmt = PromptFormat.for_tokenizer(tokenizer, shots=1)
    row = one_row_per_family()[0]
    features = tokenize_row(row, tokenizer, "duplex", fmt)
    prompt = encode(tokenizer, fmt.prompt(row["family"], row["instruction"]))
    turn = encode(tokenizer, fmt.inband_template.replace("{text}", row["update_texts"][0]))
    assert features["input_ids"][: len(prompt)] == prompt
    assert features["update_token_ids"] == [turn]  # the correction as a user turn spliced in-band writes it
    labelled = [t for t, label in zip(features["input_ids"], features["labels"], strict=True) if label != -100]
    assert tokenizer.decode(labelled) == row["response"] + tokenizer.eos_token


@pytest.mark.slow
def test_training_on_a_chat_backbone_uses_its_template_end_to_end(tmp_path):
    """`--backbone DIR` with a chat tokenizer: trains (here with the in-band teacher) and evaluates in its chat
    format, and the checkpoint splices in-band corrections as user turns."""
    tokenizer = chat_tokenizer()
    backbone = Qwen3ForCausalLM(
        backbone_config("micro", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    )
    backbone.save_pretrained(tmp_path / "backbone")
    tokenizer.save_pretrained(tmp_path / "backbone")
    out = tmp_path / "run"
    train_duplex.main([
        "--backbone", str(tmp_path / "backbone"), "--shots", "1", "--families", "repeat", "--output_dir", str(out),
        "--duplex_steps", "2", "--train_size", "16", "--per_device_train_batch_size", "4", "--eval_per_family", "1",
        "--num_slots", "8", "--encoder_layers", "1", "--distill_weight", "1",
    ])  # fmt: skip
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["inband_template"] == PromptFormat.for_tokenizer(tokenizer).inband_template
    report = json.loads((out / "final" / "eval" / "results.json").read_text())
    assert report["config"]["prompt_format"] == {"chat": True, "shots": 1}
    assert "<|im_start|>user" in report["examples"]["workspace"][0]["prompt"]
