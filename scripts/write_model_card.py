"""Write (or rewrite) the model card of a saved Duplex checkpoint, from its config and its `eval/` report.

    python scripts/write_model_card.py checkpoints/duplex-tiny --training-command "python train_duplex.py"

`save_pretrained` writes the card itself; this is for folders saved before their evaluation ran, or by hand.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configuration_duplex import DuplexConfig
from hub_duplex import ADAPTER_WEIGHTS_NAME, build_model_card

DUPLEX_PREFIXES = ("update_encoder.", "workspace.", "adapters.")


def duplex_parameter_count(folder: Path) -> int:
    """Elements of the duplex tensors stored in `folder` (adapter-only or full checkpoint)."""
    name = ADAPTER_WEIGHTS_NAME if (folder / ADAPTER_WEIGHTS_NAME).exists() else "model.safetensors"
    with safe_open(str(folder / name), framework="pt") as weights:
        shapes = [weights.get_slice(key).get_shape() for key in weights.keys() if key.startswith(DUPLEX_PREFIXES)]
    return sum(math.prod(shape) for shape in shapes)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--training-command", default=None, help="how the checkpoint was trained (shown in the card)")
    parser.add_argument("--repo-id", default=None, help="the Hub repo the card's snippet loads (default: the folder)")
    args = parser.parse_args(argv)
    config = DuplexConfig.from_pretrained(args.checkpoint)
    card = build_model_card(
        config, args.checkpoint, duplex_parameter_count(args.checkpoint), args.repo_id, args.training_command
    )
    card.save(args.checkpoint / "README.md")
    return args.checkpoint / "README.md"


if __name__ == "__main__":
    print(main())
