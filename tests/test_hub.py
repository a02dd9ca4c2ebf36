"""The Hub workflow as a user meets it: a frozen backbone on every load path, AutoModel, left padding, pushes that
carry everything in one commit (against a faked HfApi, offline), a real model card, and a backbone that cannot be
found named in the error."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import ROOT, perturb_duplex, run_in_fresh_process, tiny_backbone
from transformers import AutoTokenizer

import hub_duplex
from data import build_byte_tokenizer
from modeling_duplex import DuplexForCausalLM

TOK = build_byte_tokenizer()
TINY = ROOT / "checkpoints" / "duplex-tiny"
SMOLLM2 = ROOT / "checkpoints" / "duplex-smollm2-135m"
REMOTE_CODE = {"configuration_duplex.py", "modeling_duplex.py", "generation_duplex.py", "updates_duplex.py"}
REMOTE_CODE |= {"hub_duplex.py", "attention_duplex.py", "encoder_duplex.py"}


@pytest.fixture
def model() -> DuplexForCausalLM:
    backbone = tiny_backbone("qwen3")
    backbone.config.name_or_path = "some-org/tiny-qwen3"  # a Hub id: the card names it as the base model
    return perturb_duplex(DuplexForCausalLM.from_backbone(backbone, num_slots=4, encoder_layers=1)).eval()


def trainable_names(model) -> set[str]:
    return {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}


def read_card(folder: Path) -> tuple[dict, str]:
    """(metadata, body) of the model card in `folder`."""
    _, metadata, body = (folder / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(metadata), body


# ---- 1. frozen on every load path, AutoModel ----------------------------------------------------------------------


def test_backbone_is_frozen_on_every_load_path(model, tmp_path):
    duplex_modules = {"update_encoder", "workspace", "adapters"}
    assert trainable_names(model) == duplex_modules  # from_backbone
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "adapter", adapter_only=True)
    full = DuplexForCausalLM.from_pretrained(tmp_path / "full")
    assert trainable_names(full) == duplex_modules
    assert not any(p.requires_grad for p in full.get_base_model().parameters())
    backbone = tmp_path / "backbone"
    model.get_base_model().save_pretrained(backbone)
    adapter = DuplexForCausalLM.from_pretrained(tmp_path / "adapter", backbone_name_or_path=str(backbone))
    assert trainable_names(adapter) == duplex_modules


FRESH_LOAD = """
import json, sys
from transformers import AutoModel, AutoModelForCausalLM
path = sys.argv[1]
out = {}
for auto in (AutoModel, AutoModelForCausalLM):
    model = auto.from_pretrained(path, trust_remote_code=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out[auto.__name__] = [type(model).__name__, trainable, sum(t.numel() for t in model.duplex_state_dict().values())]
print(json.dumps(out))
"""


def test_shipped_checkpoint_loads_frozen_with_auto_model_and_remote_code_only(tmp_path):
    """A copy of the shipped tiny checkpoint, outside the repository: AutoModel and AutoModelForCausalLM both load it,
    with only the duplex parameters trainable."""
    copy = tmp_path / "duplex-tiny"
    shutil.copytree(TINY, copy)
    out = run_in_fresh_process(FRESH_LOAD, str(copy), cwd=tmp_path, timeout=300)
    for name, (cls, trainable, duplex) in out.items():
        assert cls == "DuplexForCausalLM" and trainable == duplex > 0, (name, out)


def test_a_saved_checkpoint_carries_all_its_code_and_loads_with_auto_model(model, tmp_path):
    model.save_pretrained(tmp_path / "repo")
    assert REMOTE_CODE <= {p.name for p in (tmp_path / "repo").iterdir()}
    auto_map = json.loads((tmp_path / "repo" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == auto_map["AutoModelForCausalLM"] == "modeling_duplex.DuplexForCausalLM"
    out = run_in_fresh_process(FRESH_LOAD, str(tmp_path / "repo"), cwd=tmp_path, timeout=300)
    assert out["AutoModel"][0] == "DuplexForCausalLM" and out["AutoModel"][1] == out["AutoModel"][2]


# ---- 2. left padding --------------------------------------------------------------------------------------------


def test_tokenizers_pad_on_the_left():
    assert build_byte_tokenizer().padding_side == "left"
    for checkpoint in (TINY, SMOLLM2):
        assert json.loads((checkpoint / "tokenizer_config.json").read_text())["padding_side"] == "left"


def test_a_batch_writes_what_each_prompt_writes_alone_on_the_shipped_checkpoint():
    model = DuplexForCausalLM.from_pretrained(TINY).eval()
    tok = AutoTokenizer.from_pretrained(TINY)
    prompts = ["Count from 3 to 9.\n", "Spell cat.\n"]
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)

    def new_text(enc, out) -> list[str]:
        return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    enc = tok(prompts, return_tensors="pt", padding=True)
    batch = new_text(enc, model.generate(**enc, **kwargs))
    alone = [new_text(e, model.generate(**e, **kwargs))[0] for e in (tok(p, return_tensors="pt") for p in prompts)]
    assert batch == alone and alone[1].startswith("c a t"), (batch, alone)
    updates = [[(2, "Stop at 5.")], [(2, "Spell dog instead.")]]
    batch = new_text(enc, model.generate(**enc, updates=updates, tokenizer=tok, **kwargs))
    alone = [
        new_text(e, model.generate(**e, updates=u, tokenizer=tok, **kwargs))[0]
        for e, u in zip((tok(p, return_tensors="pt") for p in prompts), updates, strict=True)
    ]
    assert batch == alone, (batch, alone)


# ---- 3. pushing ---------------------------------------------------------------------------------------------------


class FakeHfApi:
    """Records what would reach the Hub: every repo created and, per commit, the files of the uploaded folder."""

    created: list[str] = []
    commits: list[dict] = []

    def __init__(self, token=None, library_name=None, **kwargs):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        FakeHfApi.created.append(repo_id)
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"user/{repo_id}")

    def create_branch(self, repo_id, branch, exist_ok=False, **kwargs):
        pass

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        folder = Path(folder_path)
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        FakeHfApi.commits.append({"repo_id": repo_id, "message": commit_message, "files": files})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    def create_commit(self, *args, **kwargs):
        raise AssertionError("files are uploaded with upload_folder, as one commit")


@pytest.fixture
def hub(monkeypatch):
    """A faked HfApi; transformers' own Hub client must not be reached (its push writes a placeholder card)."""
    FakeHfApi.created, FakeHfApi.commits = [], []
    monkeypatch.setattr(hub_duplex, "HfApi", FakeHfApi)

    def refuse():
        raise AssertionError("transformers' own push was used")

    monkeypatch.setattr("transformers.modeling_utils.hf_api", refuse)
    monkeypatch.setattr("transformers.utils.hub.hf_api", refuse)
    return FakeHfApi


@pytest.mark.parametrize("adapter_only", [False, True])
@pytest.mark.parametrize("how", ["push_to_hub", "save_pretrained"])
def test_a_push_uploads_everything_in_one_commit(model, hub, tmp_path, adapter_only, how):
    if how == "push_to_hub":
        model.push_to_hub("me/duplex-test", adapter_only=adapter_only, commit_message="first", tags=["mine"])
    else:
        model.save_pretrained(tmp_path / "duplex-test", adapter_only=adapter_only, push_to_hub=True)
    (commit,) = hub.commits
    weights = "adapter_model.safetensors" if adapter_only else "model.safetensors"
    assert {weights, "config.json", "generation_config.json", "README.md"} | REMOTE_CODE <= set(commit["files"])
    assert commit["repo_id"] == ("me/duplex-test" if how == "push_to_hub" else "user/duplex-test")
    card = commit["files"]["README.md"].decode()
    assert "More Information Needed" not in card and "- duplex" in card
    assert ("- mine" in card) == (how == "push_to_hub") and ("- adapter" in card) == adapter_only
    folder = tmp_path / "pushed"
    for name, content in commit["files"].items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    backbone = tmp_path / "backbone"
    model.get_base_model().save_pretrained(backbone)
    reloaded = DuplexForCausalLM.from_pretrained(folder, backbone_name_or_path=str(backbone))
    for name, tensor in model.duplex_state_dict().items():
        torch.testing.assert_close(reloaded.duplex_state_dict()[name], tensor, msg=name)


# ---- 4. the model card --------------------------------------------------------------------------------------------


def test_every_save_writes_a_real_model_card(model, tmp_path):
    folder = tmp_path / "duplex-test"
    (folder / "eval").mkdir(parents=True)
    shutil.copy(TINY / "eval" / "results.json", folder / "eval" / "results.json")
    (folder / "eval" / "train_args.json").write_text(json.dumps({"command": "python train_duplex.py --seed 3"}))
    model.save_pretrained(folder, adapter_only=True)
    metadata, body = read_card(folder)
    assert metadata["base_model"] == "some-org/tiny-qwen3"
    assert {"duplex", "custom_code"} <= set(metadata["tags"]) and metadata["library_name"] == "transformers"
    assert "updates=[(" in body and "UpdateStream" in body and "backbone_name_or_path=" in body
    assert "python train_duplex.py --seed 3" in body
    results = json.loads((TINY / "eval" / "results.json").read_text())["metrics"]["workspace"]
    (index,) = metadata["model-index"]
    values = {m["type"]: m["value"] for r in index["results"] for m in r["metrics"]}
    assert values["revision_accuracy"] == round(results["revision_accuracy"]["overall"]["rate"], 4)
    assert values["contradiction_rate"] == round(results["contradiction_rate"]["overall"]["rate"], 4)


def test_a_card_without_an_evaluation_has_no_model_index(model, tmp_path):
    model.save_pretrained(tmp_path / "plain")
    metadata, body = read_card(tmp_path / "plain")
    assert "model-index" not in metadata and "## Evaluation" not in body
    assert "python train_duplex.py --backbone some-org/tiny-qwen3" in body


@pytest.mark.parametrize("checkpoint", [TINY, SMOLLM2])
def test_shipped_checkpoints_carry_their_card(checkpoint):
    metadata, body = read_card(checkpoint)
    assert {"duplex", "custom_code"} <= set(metadata["tags"])
    assert metadata["model-index"] and "python train_duplex.py" in body and "## Evaluation" in body
    if checkpoint == SMOLLM2:
        assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---- 5. the backbone of an adapter-only checkpoint ----------------------------------------------------------------


def test_the_smollm2_adapter_names_its_hub_backbone():
    config = json.loads((SMOLLM2 / "config.json").read_text())
    assert config["backbone_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_backbone_that_cannot_be_found_is_named_with_how_to_use_a_local_copy():
    with pytest.raises(OSError, match=r"'HuggingFaceTB/SmolLM2-135M-Instruct'(.|\n)*backbone_name_or_path="):
        DuplexForCausalLM.from_pretrained(SMOLLM2, local_files_only=True)


@pytest.mark.slow
def test_train_duplex_pushes_the_final_model_and_its_evaluation_to_one_repo(hub, tmp_path, caplog):
    """`--push_to_hub` without `--hub_model_id`: one commit, to a repo named after the output dir (and said so),
    carrying the model, its tokenizer, its card and its evaluation report; the phases push nothing."""
    import train_duplex

    out = tmp_path / "my-duplex-run"
    argv = [
        "--output_dir", str(out), "--families", "list", "--duplex_steps", "2", "--train_size", "16",
        "--per_device_train_batch_size", "4", "--save_steps", "100", "--num_slots", "4", "--encoder_layers", "1",
        "--eval_per_family", "1", "--eval_sweep_per_family", "0", "--push_to_hub", "True", "--disable_tqdm", "True",
    ]  # fmt: skip
    with caplog.at_level("INFO", logger="train_duplex"):
        train_duplex.main(argv)
    (commit,) = hub.commits
    assert commit["repo_id"] == "user/my-duplex-run" and hub.created == ["my-duplex-run"]
    expected = {"model.safetensors", "tokenizer.json", "README.md", "eval/results.json", "eval/train_args.json"}
    assert expected | REMOTE_CODE <= set(commit["files"])
    assert "to the Hub repo my-duplex-run" in caplog.text
    card = commit["files"]["README.md"].decode()
    assert "model-index" in card and shlex_join_argv(argv) in card
    assert json.loads(commit["files"]["tokenizer_config.json"])["padding_side"] == "left"


def shlex_join_argv(argv: list[str]) -> str:
    import shlex

    return shlex.join(["python", "train_duplex.py", *argv])


# ---- 9. the README's first example --------------------------------------------------------------------------------


def test_the_readmes_first_example_runs_as_written_and_prints_what_it_says():
    """The Usage section's first snippet, run from the repository root in a fresh process, prints the lines its
    comments show: the count without an update, and the count the correction asks for."""
    import re
    import subprocess
    import sys

    usage = (ROOT / "README.md").read_text().split("\n## Usage\n", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    shown = [line[2:] for line in snippet.splitlines() if line.startswith("# ")]
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == shown == ["3 4 5 6 7 8 9 10 11", "3 4 5 6 7"]
