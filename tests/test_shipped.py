"""The shipped checkpoints: the offline default's frozen backbone and the trained Duplex-tiny, loaded the way a
user loads them, with the project not importable (trust_remote_code); the SmolLM2 adapter's own test is
tests/test_smollm2.py."""

from conftest import ROOT, run_in_fresh_process

CHECKPOINTS = ROOT / "checkpoints"
REMOTE_CODE = (
    "configuration_duplex.py",
    "modeling_duplex.py",
    "generation_duplex.py",
    "updates_duplex.py",
    "hub_duplex.py",
)

SCRIPT = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
enc = tok("Name 5 tools.\\n", return_tensors="pt")
def write(updates=None):
    ids = model.generate(**enc, max_new_tokens=48, do_sample=False, updates=updates, tokenizer=tok)
    return tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
print(json.dumps({"plain": write(), "corrected": write([(0, "Name animals instead.")])}))
"""


def test_shipped_checkpoint_takes_a_correction_out_of_the_box(tmp_path):
    """A fresh process, outside the repository: the checkpoint's own code loads, and a correction that lands before
    the first token moves the answer off the old category (the tools it would have named)."""
    out = run_in_fresh_process(SCRIPT, str(CHECKPOINTS / "duplex-tiny"), cwd=tmp_path, timeout=600)
    tools = set(out["plain"].split(", "))
    assert len(tools) >= 4, out  # the backbone's own answer: tools
    assert not tools & set(out["corrected"].split(", ")), out


def test_shipped_remote_code_is_the_repository_code():
    """`trust_remote_code` runs the checkpoint's own copies of the model files: they must be the repository's."""
    for checkpoint in ("duplex-tiny", "duplex-smollm2-135m"):
        for name in REMOTE_CODE:
            shipped = CHECKPOINTS / checkpoint / name
            assert shipped.read_text() == (ROOT / name).read_text(), f"{shipped} differs from {name}: copy it over"
