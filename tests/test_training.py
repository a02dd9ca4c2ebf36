"""Training end to end: resume after a kill, and a micro run that proves the correction channel learns."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

import eval_duplex
import train_duplex

MICRO = [
    "--pretrain_backbone", "--phase0_steps", "6", "--phase0_batch_size", "4", "--duplex_steps", "6",
    "--train_size", "64", "--per_device_train_batch_size", "4", "--save_steps", "2", "--logging_steps", "2",
    "--skip_eval",
    "--encoder_layers", "1", "--num_slots", "4",
]  # fmt: skip


MICRO_STEPS = "150"


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


@pytest.mark.slow
def test_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    train_duplex.main(["--output_dir", str(tmp_path / "straight"), *MICRO])
    expected = final_weights(tmp_path / "straight")

    killed = tmp_path / "killed"
    real_step, calls = Trainer.training_step, {"n": 0}

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6 + 5:  # phase 0 (6) done, the duplex phase past its checkpoint-4
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_duplex.main(["--output_dir", str(killed), *MICRO])
    monkeypatch.setattr(Trainer, "training_step", real_step)
    assert (killed / "duplex" / "checkpoint-4").exists() and not (killed / "final").exists()

    train_duplex.main(["--output_dir", str(killed), *MICRO, "--resume_from_checkpoint", "True"])
    resumed = final_weights(killed)
    assert resumed.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(resumed[key], tensor, atol=1e-6, rtol=0, msg=key)
    assert (killed / "duplex" / "loss.png").exists()


@pytest.mark.slow
def test_micro_run_revises_held_out_instances(tmp_path):
    """A few-minute run of the duplex modules on the shipped frozen backbone, one family (list: switch category
    mid-answer). On held-out instances the workspace's revision accuracy beats the ablation (corrections dropped)
    by at least 30 points."""
    out = tmp_path / "micro"
    train_duplex.main([
        "--output_dir", str(out), "--families", "list", "--duplex_steps", MICRO_STEPS, "--train_size", "4000",
        "--save_steps", "10000", "--logging_steps", "50", "--skip_eval", "--disable_tqdm", "True",
    ])  # fmt: skip
    model, tokenizer = eval_duplex.load_checkpoint(out / "final")
    results = eval_duplex.evaluate(
        model, tokenizer, n_per_family=24, modes=("workspace", "ignore"), families=["list"], sweep_per_family=0,
        progress=False,
    )  # fmt: skip
    revision = {m: results["metrics"][m]["revision_accuracy"]["overall"]["rate"] for m in ("workspace", "ignore")}
    assert revision["workspace"] - revision["ignore"] >= 0.30, revision
