"""Multi-process training: two CPU processes (gloo) under `accelerate launch`, as users run DDP on GPUs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

NUM_PROCESSES, STEPS, BATCH = 2, 4, 4


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """A micro duplex run on the shipped backbone: two processes, one thread each, a trained update encoder."""
    out = tmp_path_factory.mktemp("ddp")
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(NUM_PROCESSES), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(ROOT / "tests" / "distributed_worker.py"),
        "--use_cpu", "True", "--output_dir", str(out), "--duplex_steps", str(STEPS), "--train_size", "64",
        "--per_device_train_batch_size", str(BATCH), "--warmup_steps", "0", "--encoder_layers", "1",
        "--num_slots", "8", "--save_strategy", "no", "--logging_steps", "1", "--skip_eval", "--disable_tqdm", "True",
    ]  # fmt: skip
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env = os.environ | threads | {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


def rank_record(out: Path, rank: int) -> dict:
    return json.loads((out / "ranks" / f"rank{rank}.json").read_text())


@pytest.mark.slow
def test_processes_train_on_disjoint_shards(ddp_run):
    records = [rank_record(ddp_run, rank) for rank in range(NUM_PROCESSES)]
    assert [r["process_index"] for r in records] == list(range(NUM_PROCESSES))
    assert all(r["world_size"] == NUM_PROCESSES for r in records)
    shards = [r["rows"] for r in records]
    for rows in shards:
        assert len(rows) == STEPS * BATCH and len(set(rows)) == len(rows)
    assert not set(shards[0]) & set(shards[1]), shards


@pytest.mark.slow
def test_processes_end_with_identical_trained_weights(ddp_run):
    finals = [load_file(ddp_run / "ranks" / f"rank{rank}-final.safetensors") for rank in range(NUM_PROCESSES)]
    initial = load_file(ddp_run / "ranks" / "rank0-initial.safetensors")
    assert finals[0].keys() == finals[1].keys() == initial.keys()
    assert any(k.startswith("update_encoder.") for k in initial) and any(k.endswith(".gate") for k in initial)
    for key, tensor in finals[0].items():
        assert torch.equal(tensor, finals[1][key]), key  # gradients were averaged: the replicas never diverged
    moved = [key for key, tensor in finals[0].items() if not torch.equal(tensor, initial[key])]
    assert any(k.endswith(".gate") for k in moved) and any(k.startswith("update_encoder.") for k in moved), moved


@pytest.mark.slow
def test_checkpoint_of_the_main_process_loads_and_generates_with_updates(ddp_run):
    final = ddp_run / "final"
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(final)
    trained = load_file(ddp_run / "ranks" / "rank0-final.safetensors")
    for key, tensor in model.duplex_state_dict().items():
        assert torch.equal(tensor, trained[key]), key
    enc = tok("Name 4 fruits.\n", return_tensors="pt")
    out = model.generate(
        **enc,
        max_new_tokens=12,
        do_sample=False,
        updates=[(2, "Name animals instead.")],
        tokenizer=tok,
        return_dict_in_generate=True,
    )
    landing = out.update_landings[0][0]
    assert landing.applied and landing.at == 2, landing
    assert out.sequences.shape[1] > enc["input_ids"].shape[1] + 2


@pytest.mark.slow
def test_the_fsdp_config_shards_a_trainable_duplex_model(tmp_path):
    """configs/fsdp_1.7b.yaml's units, applied with accelerate's auto-wrap policy and FSDP2 on two CPU processes
    (accelerate itself runs FSDP on GPUs only): a step with updates runs sharded, and its duplex gradients are those
    of the unsharded model in bf16, the same on every process; the gathered weights rebuild the plain model."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert {"FSDPQwen3MLP", "FSDPUpdateEncoderLayer", "FSDPDuplexForCausalLM"} <= set(ranks[0]["units"])
    for record in ranks:
        assert record["loss"] == pytest.approx(record["reference_loss"], rel=0.03)
        grads = torch.cat([g.flatten() for g in record["grads"].values()])
        reference = torch.cat([g.flatten() for g in record["reference_grads"].values()])
        assert reference.norm() > 0 and torch.isfinite(grads).all()
        assert torch.nn.functional.cosine_similarity(grads, reference, dim=0) > 0.99
        assert (grads - reference).norm() < 0.1 * reference.norm()  # bf16 compute on both sides
    for key, grad in ranks[0]["grads"].items():
        assert torch.equal(grad, ranks[1]["grads"][key]), key
    rebuilt = ranks[0]["rebuilt"]  # gathered as accelerate does, rebuilt as train_duplex.py does before saving
    assert rebuilt["weights_equal"] and rebuilt["tied"] and rebuilt["landed"], rebuilt
    assert rebuilt["dtypes"] == ["torch.bfloat16", "torch.float32"]  # bf16 backbone, fp32 duplex modules
    assert rebuilt["trainable"] == ["adapters", "update_encoder", "workspace"]  # the workspace: its readout gate
