"""`train_duplex.py` under `accelerate launch`, recording what each process trained on.

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_worker.py --use_cpu True [train_duplex args]

Runs `train_duplex.main` unchanged, except that every process writes to `OUTPUT/ranks/`:

- `rank{R}.json`: the training-set indices of the rows its training steps ran on, in order;
- `rank{R}-initial.safetensors`, `rank{R}-final.safetensors`: its duplex weights when training starts and ends.

`tests/test_distributed.py` reads them to check that the processes trained on different shards and ended with the
same weights. Not collected by pytest (the name does not start with `test_`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_duplex

INDEX_COLUMN = "row_index"
trained_rows: list[int] = []  # this process's, in training order


class RecordingCollator(train_duplex.DuplexCollator):
    """The project's collator, passing each row's training-set index along as a tensor beside the batch."""

    def __call__(self, features: list[dict]) -> dict:
        batch = super().__call__([{k: v for k, v in f.items() if k != INDEX_COLUMN} for f in features])
        return batch | {INDEX_COLUMN: torch.tensor([f[INDEX_COLUMN] for f in features])}


def indexed(*args, **kwargs) -> datasets.Dataset:
    """`train_duplex.tokenized` with each row's position in the training set as an extra column."""
    rows = real_tokenized(*args, **kwargs)
    return rows.add_column(INDEX_COLUMN, list(range(len(rows))))


class RecordWeights(TrainerCallback):
    """Writes this process's duplex weights at the start and the end of training, and the rows it trained on."""

    def save(self, args, model, tag: str) -> None:
        ranks = Path(args.output_dir).parent / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.duplex_state_dict().items()}
        save_file(weights, str(ranks / f"rank{args.process_index}-{tag}.safetensors"))
        if tag == "final":
            record = {"process_index": args.process_index, "world_size": args.world_size, "rows": trained_rows}
            (ranks / f"rank{args.process_index}.json").write_text(json.dumps(record))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.save(args, model, "initial")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.save(args, model, "final")


class RecordingTrainer(train_duplex.DuplexTrainer):
    """Notes the rows of every batch a training step runs on (data loaders may collate a batch ahead)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(RecordWeights())

    def training_step(self, model, inputs, *args, **kwargs):
        trained_rows.extend(inputs.pop(INDEX_COLUMN).tolist())
        return super().training_step(model, inputs, *args, **kwargs)


real_tokenized = train_duplex.tokenized
train_duplex.tokenized = indexed
train_duplex.DuplexCollator = RecordingCollator
train_duplex.DuplexTrainer = RecordingTrainer

if __name__ == "__main__":
    train_duplex.main()
