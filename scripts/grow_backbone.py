"""Deepen a pretrained backbone without changing what it computes (block expansion, as in LLaMA Pro): each new
decoder layer copies the layer before it and has its two output projections (`o_proj`, `down_proj`) zeroed, so it
adds nothing to the residual stream until training moves it. Phase 0 then goes on from the grown weights.

    python scripts/grow_backbone.py --src checkpoints/duplex-tiny-backbone --after 1 3 --out runs/backbone-6l
    python train_duplex.py --pretrain_backbone --pretrain_only --phase0_init runs/backbone-6l ...
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


def grow_backbone(model: PreTrainedModel, after: Sequence[int]) -> PreTrainedModel:
    """Insert an identity copy of decoder layer `i` right after it, for every `i` in `after` (original indices)."""
    layers = model.model.layers
    if not after or any(not 0 <= i < len(layers) for i in after):
        raise ValueError(f"after: layer indices in [0, {len(layers)}) expected, got {list(after)}")
    grown = []
    for i, layer in enumerate(layers):
        grown.append(layer)
        for _ in range(list(after).count(i)):
            new = copy.deepcopy(layer)
            torch.nn.init.zeros_(new.self_attn.o_proj.weight)  # attention adds nothing to the residual stream ...
            torch.nn.init.zeros_(new.mlp.down_proj.weight)  # ... and neither does the MLP: the layer is the identity
            grown.append(new)
    for index, layer in enumerate(grown):
        layer.self_attn.layer_idx = index  # the KV cache is indexed by layer
    model.model.layers = torch.nn.ModuleList(grown)
    config = model.config
    kinds = list(config.layer_types)
    config.layer_types = [kinds[i] for i in range(len(kinds)) for _ in range(1 + list(after).count(i))]
    config.num_hidden_layers = len(grown)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default="checkpoints/duplex-tiny-backbone", help="backbone to deepen")
    parser.add_argument("--after", type=int, nargs="+", required=True, help="insert a new layer after these layers")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32)
    grow_backbone(model, args.after).save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.src).save_pretrained(args.out)
    print(f"{args.src} -> {args.out}: {model.config.num_hidden_layers} layers")


if __name__ == "__main__":
    main()
