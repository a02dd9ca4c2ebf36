"""Training end to end: resume after a kill, and a micro run that proves the correction channel learns."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

import eval_duplex
import train_duplex
from data import build_dataset
from data.collate import DuplexCollator, tokenize_row
from modeling_duplex import NO_UPDATE

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


def post_update_nll(model, tokenizer, rows, drop_corrections: bool) -> float:
    """Teacher-forced NLL of the response tokens after each row's first correction."""
    batch = DuplexCollator(tokenizer.pad_token_id)([tokenize_row(r, tokenizer) for r in rows])
    positions = batch["update_positions"].clone()
    after = torch.arange(batch["input_ids"].shape[1])[None] > positions[:, 1:2]
    if drop_corrections:  # keep the prompt (update 0): exactly what update_mode="ignore" leaves
        positions[:, 1:] = NO_UPDATE
    with torch.no_grad():
        return model(
            **{**batch, "update_positions": positions, "labels": batch["labels"].masked_fill(~after, -100)}
        ).loss.item()


@pytest.mark.slow
def test_micro_run_learns_the_correction_channel(tmp_path):
    """A ~2 minute run on one family (list: switch category mid-answer). On held-out category switches the
    workspace must at least halve the NLL of what follows the correction, against the ablation (corrections
    dropped). Issue 3 asks for a 30-point revision-accuracy gap; this micro run does not reach that (see README)."""
    out = tmp_path / "micro"
    train_duplex.main([
        "--output_dir", str(out), "--families", "list", "--phase0_steps", "400", "--phase1_steps", "0",
        "--phase2_steps", "500", "--train_size", "8000", "--save_steps", "10000", "--logging_steps", "100",
        "--skip_eval", "--disable_tqdm", "True",
    ])  # fmt: skip
    model, tokenizer = eval_duplex.load_checkpoint(out / "final")
    rows = build_dataset("test", 64, seed=0, mix={"one": 1.0}, families=["list"])
    workspace = post_update_nll(model, tokenizer, rows, drop_corrections=False)
    ignore = post_update_nll(model, tokenizer, rows, drop_corrections=True)
    assert workspace <= 0.5 * ignore, {"workspace": workspace, "ignore": ignore}
