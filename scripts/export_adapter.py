"""Write a trained Duplex checkpoint's adapter alone (PEFT-style): config, duplex weights, tokenizer and remote code,
loaded again on top of the backbone its config names (`backbone_name_or_path`).

    python scripts/export_adapter.py runs/smollm2-duplex/final checkpoints/duplex-smollm2-135m \
        --backbone-id HuggingFaceTB/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_duplex import DuplexForCausalLM


def export_adapter(checkpoint: str | Path, out: str | Path, backbone_id: str | None = None) -> Path:
    """Save `checkpoint`'s duplex modules without the frozen backbone they were trained on; `backbone_id`: the Hub id
    the adapter names as its backbone, where training read a local copy of it."""
    model = DuplexForCausalLM.from_pretrained(str(checkpoint))
    if backbone_id is not None:
        model.config.backbone_name_or_path = backbone_id
    if not model.config.backbone_name_or_path:
        raise SystemExit(f"{checkpoint} names no backbone (`backbone_name_or_path`) to load the adapter on")
    model.save_pretrained(out, adapter_only=True)
    # a Duplex config names its remote code (the code this script runs): its tokenizer loads without a prompt
    AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=True).save_pretrained(out)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a complete Duplex checkpoint (train_duplex.py's OUTPUT/final)")
    parser.add_argument("out", help="folder to write the adapter to")
    parser.add_argument(
        "--backbone-id", default=None, help="the backbone's Hub id, named in the adapter's config (default: as trained)"
    )
    args = parser.parse_args(argv)
    print(export_adapter(args.checkpoint, args.out, args.backbone_id))


if __name__ == "__main__":
    main()
