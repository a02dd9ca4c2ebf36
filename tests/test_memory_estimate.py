"""scripts/memory_estimate.py: parameter counts from config.json, per-GPU totals that behave, the README's table."""

import importlib.util
import re
import shlex
import sys

import pytest
import torch
from conftest import ROOT

from configuration_duplex import DuplexConfig
from modeling_duplex import DuplexForCausalLM


@pytest.fixture(scope="module")
def memory_estimate():
    spec = importlib.util.spec_from_file_location("memory_estimate", ROOT / "scripts" / "memory_estimate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # scripts/ is not a package; dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def totals(result: dict, kind: str = "total_checkpointed") -> dict[str, float]:
    return {name: row[kind] for name, row in result["bytes_per_gpu"].items()}


def test_counts_match_the_model_on_the_meta_device(memory_estimate, capsys):
    result = memory_estimate.main(["--json", "--num-gpus", "2"])
    with torch.device("meta"):
        model = DuplexForCausalLM(DuplexConfig.from_pretrained(ROOT))
    trainable, total = model.get_nb_trainable_parameters()
    params = result["parameters"]
    assert (params["trainable"], params["frozen"]) == (trainable, total - trainable)
    text = model.config.text_config
    assert params["units"] == text.num_hidden_layers + model.config.encoder_layers  # Qwen3MLP + UpdateEncoderLayer
    assert 0 < params["largest_unit"] < params["root"] < total
    assert '"FSDP2"' in capsys.readouterr().out


def test_totals_behave(memory_estimate):
    eight, sixteen = (memory_estimate.main(["--json", "--num-gpus", str(n)]) for n in (8, 16))
    for result in (eight, sixteen):
        per_gpu = totals(result)
        assert per_gpu["FSDP2"] < per_gpu["ZeRO-2"] < per_gpu["DDP"]
        for name, row in result["bytes_per_gpu"].items():
            assert row["activations_checkpointed"] < row["activations_not_checkpointed"], name
    assert totals(sixteen)["DDP"] == totals(eight)["DDP"]  # a full replica per GPU, whatever the count
    assert totals(sixteen)["FSDP2"] < totals(eight)["FSDP2"] and totals(sixteen)["ZeRO-2"] < totals(eight)["ZeRO-2"]
    ddp = eight["bytes_per_gpu"]["DDP"]
    assert ddp["backbone_weights"] == 2 * eight["parameters"]["frozen"]  # bf16
    assert ddp["adam_states"] == 8 * eight["parameters"]["trainable"]  # two fp32 states
    longer = memory_estimate.main(["--json", "--num-gpus", "8", "--seq-len", "4096"])
    assert totals(longer)["DDP"] > totals(eight)["DDP"]


def test_readme_table_is_the_scripts_output(memory_estimate, capsys):
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"`python scripts/memory_estimate\.py([^`\n]*)`", readme)
    assert match, "README: the command that made the memory table"
    memory_estimate.main(shlex.split(match.group(1)))
    table = capsys.readouterr().out.strip()
    assert table in readme
