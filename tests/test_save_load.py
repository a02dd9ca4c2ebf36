"""Checkpoints: a full Hub repo that loads with trust_remote_code in a fresh process, and adapter-only ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, perturb_duplex, tiny_backbone
from safetensors import safe_open

from configuration_duplex import DuplexConfig
from data import build_byte_tokenizer
from modeling_duplex import ADAPTER_WEIGHTS_NAME, DuplexForCausalLM

TOK = build_byte_tokenizer()
PROMPT = "Say apple 5 times.\n"
UPDATES = [(0, "Say pear instead."), (3, "Say plum instead.")]


def generate(model) -> list[int]:
    enc = TOK(PROMPT, return_tensors="pt")
    return model.generate(**enc, updates=UPDATES, tokenizer=TOK, max_new_tokens=10, do_sample=False)[0].tolist()


def test_only_duplex_parameters_train(duplex):
    trainable = {name for name, p in duplex.named_parameters() if p.requires_grad}
    assert trainable and all(name.split(".")[0] in {"update_encoder", "workspace", "adapters"} for name in trainable)
    assert trainable == {name for name, _ in duplex.named_parameters()} - {
        name for name, _ in duplex.named_parameters() if name.startswith(("model.", "lm_head."))
    }


def test_full_checkpoint_loads_with_remote_code_in_a_fresh_process(tmp_path):
    model = perturb_duplex(DuplexForCausalLM.from_backbone(tiny_backbone("llama"), num_slots=4, encoder_layers=1))
    expected = generate(model.eval())
    repo = tmp_path / "repo"
    model.save_pretrained(repo)
    TOK.save_pretrained(repo)
    files = {p.name for p in repo.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_duplex.py", "configuration_duplex.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((repo / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_duplex.DuplexForCausalLM"

    script = f"""
import json, sys
assert not any(p and {str(ROOT)!r} in p for p in sys.path), sys.path
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(repo)!r}, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained({str(repo)!r})
enc = tok({PROMPT!r}, return_tensors="pt")
out = model.generate(**enc, updates={UPDATES!r}, tokenizer=tok, max_new_tokens=10, do_sample=False)
print("RESULT=" + json.dumps(out[0].tolist()))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.split("RESULT=")[-1]) == expected


def test_adapter_only_checkpoint_round_trip(tmp_path):
    backbone_dir = tmp_path / "backbone"
    tiny_backbone("qwen3").save_pretrained(backbone_dir)
    model = perturb_duplex(DuplexForCausalLM.from_backbone(str(backbone_dir), num_slots=4, encoder_layers=1)).eval()
    assert model.config.backbone_name_or_path == str(backbone_dir)
    expected = generate(model)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir, adapter_only=True)

    assert (adapter_dir / ADAPTER_WEIGHTS_NAME).exists() and not list(adapter_dir.glob("model*.safetensors"))
    with safe_open(adapter_dir / ADAPTER_WEIGHTS_NAME, "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.duplex_state_dict()) and not any(k.startswith(("model.", "lm_head")) for k in keys)

    reloaded = DuplexForCausalLM.from_pretrained(adapter_dir).eval()
    assert reloaded.config.num_slots == 4 and reloaded.config.encoder_layers == 1
    assert generate(reloaded) == expected
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[key]), key


def test_adapter_exported_from_a_full_checkpoint_loads_on_a_moved_backbone(tmp_path):
    """`scripts/export_adapter.py` keeps the duplex weights of a complete checkpoint; `backbone_name_or_path=` loads
    them on a copy of the backbone that lives elsewhere than the config says."""
    from scripts.export_adapter import export_adapter

    backbone_dir = tmp_path / "backbone"
    tiny_backbone("llama").save_pretrained(backbone_dir)
    model = perturb_duplex(DuplexForCausalLM.from_backbone(str(backbone_dir), num_slots=4, encoder_layers=1)).eval()
    expected = generate(model)
    model.save_pretrained(tmp_path / "full")
    build_byte_tokenizer().save_pretrained(tmp_path / "full")
    export_adapter(tmp_path / "full", tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").glob("*.safetensors")) == [ADAPTER_WEIGHTS_NAME]
    moved = backbone_dir.rename(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        DuplexForCausalLM.from_pretrained(tmp_path / "adapter")
    reloaded = DuplexForCausalLM.from_pretrained(tmp_path / "adapter", backbone_name_or_path=str(moved)).eval()
    assert generate(reloaded) == expected


def test_hub_config_instantiates_on_meta_device():
    """The committed config.json is Duplex-1.1-1.7B: the Qwen3-1.7B-Base architecture plus the duplex modules."""
    config = DuplexConfig.from_pretrained(ROOT)
    assert config.backbone_name_or_path == "Qwen/Qwen3-1.7B-Base"
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (2048, 28)
    assert config.num_slots == 32 and config.encoder_layers == 4
    with torch.device("meta"):
        model = DuplexForCausalLM(config)
    trainable, total = model.get_nb_trainable_parameters()
    assert 1.6e9 < total - trainable < 1.8e9  # the frozen backbone (tied embeddings counted once)
    assert 0 < trainable < 0.25 * (total - trainable)
    assert Path(ROOT / "modeling_duplex.py").exists()
