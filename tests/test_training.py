"""Training end to end: resume after a kill, and a micro run that proves the correction channel learns."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

import train_duplex

MICRO = [
    "--phase0_steps", "6", "--phase1_steps", "2", "--phase2_steps", "6", "--train_size", "64",
    "--per_device_train_batch_size", "4", "--save_steps", "2", "--logging_steps", "2", "--skip_eval",
    "--encoder_layers", "1", "--num_slots", "4",
]  # fmt: skip


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
        if calls["n"] == 6 + 2 + 5:  # phase 0 (6) and phase 1 (2) done, phase 2 past its checkpoint-4
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_duplex.main(["--output_dir", str(killed), *MICRO])
    monkeypatch.setattr(Trainer, "training_step", real_step)
    assert (killed / "phase2" / "checkpoint-4").exists() and not (killed / "final").exists()

    train_duplex.main(["--output_dir", str(killed), *MICRO, "--resume_from_checkpoint", "True"])
    resumed = final_weights(killed)
    assert resumed.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(resumed[key], tensor, atol=1e-6, rtol=0, msg=key)
    assert (killed / "phase2" / "loss.png").exists()
