"""Training memory per GPU for each accelerate config under configs/, estimated from a Duplex config.json.

    python scripts/memory_estimate.py                                  # config.json (Duplex-1.1-1.7B), 8 GPUs
    python scripts/memory_estimate.py --num-gpus 4 --batch 2 --seq-len 1024 --json

The parameters are counted by instantiating the config on the meta device (no weights are read): the frozen backbone
(tied embeddings once) and the trainable duplex modules. Bytes per GPU, with N GPUs, micro batch B, sequence length T:

| part | DDP (`configs/ddp.yaml`) | FSDP2 (`configs/fsdp_1.7b.yaml`) | ZeRO-2 (`configs/deepspeed_zero2.yaml`) |
|---|---|---|---|
| backbone weights | 2 P_frozen (bf16) | 2 P_frozen / N | 2 P_frozen |
| duplex weights | 4 P_train (fp32) | 4 P_train / N | 2 P_train (bf16 copy) + 4 P_train / N (fp32 master) |
| gradients | 4 P_train + 4 P_train (DDP's buckets) | 4 P_train / N | 2 P_train / N (bf16, partitioned) |
| Adam (2 states) | 8 P_train | 8 P_train / N | 8 P_train / N |
| gathered for compute | - | 2 P_root + 2 x 2 P_unit (bf16) | - |

FSDP2 keeps the root unit (whatever is not inside a wrapped class) gathered from the forward to the end of the
backward pass, and one more unit besides the one computing (prefetch); `P_unit` is the largest wrapped unit. The
wrapped classes are read from the FSDP config. DeepSpeed's communication buckets, the CUDA context and allocator
fragmentation are not counted.

Activations (bf16, the same for every config: each GPU runs its own micro batch) of one decoder layer that reads
the workspace, as `WorkspaceAdapter` computes it (eager attention over the context, which materialises (B, heads, T,
T) scores, their masked copy and the probabilities):

    layer = 2 B T (4 H + 2 (Q + 2 KV) + 2 Q + 4 Q + 4 I) + 2 B heads T^2 x 3

(H hidden size, Q = heads x head_dim, KV = kv_heads x head_dim, I = MLP width: the norms' inputs and outputs, q/k/v
before and after their norms and rotary, the GQA-repeated keys and values, the context and workspace outputs, their
blend and o_proj's input, the MLP's gate, up, activation and product), and the loss keeps 10 B T V bytes (bf16 logits,
their fp32 copy and fp32 log-softmax). Two columns:

- checkpointed: per-layer activation checkpointing keeps each layer's input, 2 B T H bytes per layer, and one
  layer's activations during its recomputation: `L x 2 B T H + layer + logits`;
- not checkpointed: `L x layer + logits`. (The layers that read the workspace are checkpointed as their decoder
  layer would be: `_decode` recomputes their read.)

The update encoder and the workspace's own pass (at most `num_updates x num_slots` tokens per row) are small next
to T tokens and are not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from configuration_duplex import DuplexConfig  # noqa: E402
from modeling_duplex import DuplexForCausalLM  # noqa: E402

GIB = 1024**3
BF16, FP32 = 2, 4
STRATEGIES = {  # name -> accelerate config it describes
    "DDP": "configs/ddp.yaml",
    "FSDP2": "configs/fsdp_1.7b.yaml",
    "ZeRO-2": "configs/deepspeed_zero2.yaml",
}


@dataclass
class ParameterCounts:
    frozen: int
    trainable: int
    root: int  # FSDP: parameters outside every wrapped class (the root unit)
    largest_unit: int  # FSDP: the largest wrapped unit
    units: int


@dataclass
class Estimate:
    strategy: str
    backbone_weights: float
    duplex_weights: float
    gradients: float
    adam_states: float
    gathered: float
    activations_checkpointed: float
    activations_not_checkpointed: float

    @property
    def total_checkpointed(self) -> float:
        return self.static + self.activations_checkpointed

    @property
    def total_not_checkpointed(self) -> float:
        return self.static + self.activations_not_checkpointed

    @property
    def static(self) -> float:
        return self.backbone_weights + self.duplex_weights + self.gradients + self.adam_states + self.gathered


def fsdp_wrap_classes(fsdp_config: Path) -> list[str]:
    """`fsdp_transformer_layer_cls_to_wrap` of an accelerate config file."""
    from accelerate.commands.config.config_args import load_config_from_file

    names = load_config_from_file(str(fsdp_config)).fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    return [name.strip() for name in names.split(",")]


def count_parameters(config: DuplexConfig, wrap_classes: list[str]) -> ParameterCounts:
    """Frozen and trainable parameters of the model `config` describes, and its FSDP units, on the meta device."""
    with torch.device("meta"):
        model = DuplexForCausalLM(config)
    params = list(model.parameters())  # shared (tied) parameters once
    units = [m for m in model.modules() if type(m).__name__ in wrap_classes]
    unit_sizes = [sum(p.numel() for p in m.parameters()) for m in units]
    total = sum(p.numel() for p in params)
    return ParameterCounts(
        frozen=sum(p.numel() for p in params if not p.requires_grad),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        root=total - sum(unit_sizes),
        largest_unit=max(unit_sizes, default=0),
        units=len(units),
    )


def layer_activation_bytes(config: DuplexConfig, batch: int, seq_len: int) -> int:
    """Activations one workspace-reading decoder layer keeps for its backward pass (bf16), as the module docstring
    counts them."""
    text = config.text_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    q, kv = heads * head_dim, (text.num_key_value_heads or heads) * head_dim
    per_token = 4 * text.hidden_size + 2 * (q + 2 * kv) + 2 * q + 4 * q + 4 * text.intermediate_size
    return BF16 * batch * seq_len * per_token + BF16 * batch * heads * seq_len**2 * 3


def activation_bytes(config: DuplexConfig, batch: int, seq_len: int) -> tuple[int, int]:
    """(checkpointed, not checkpointed) activation bytes of one micro batch."""
    text = config.text_config
    layers = text.num_hidden_layers
    layer = layer_activation_bytes(config, batch, seq_len)
    logits = batch * seq_len * text.vocab_size * (BF16 + FP32 + FP32)
    checkpointed = layers * BF16 * batch * seq_len * text.hidden_size + layer + logits
    return checkpointed, layers * layer + logits


def estimate(counts: ParameterCounts, config: DuplexConfig, num_gpus: int, batch: int, seq_len: int) -> list[Estimate]:
    """Bytes per GPU for each strategy (see the module docstring for the formulas)."""
    n, frozen, train = num_gpus, counts.frozen, counts.trainable
    checkpointed, not_checkpointed = activation_bytes(config, batch, seq_len)
    activations = dict(activations_checkpointed=checkpointed, activations_not_checkpointed=not_checkpointed)
    return [
        Estimate(
            "DDP",
            backbone_weights=BF16 * frozen,
            duplex_weights=FP32 * train,
            gradients=2 * FP32 * train,
            adam_states=2 * FP32 * train,
            gathered=0,
            **activations,
        ),
        Estimate(
            "FSDP2",
            backbone_weights=BF16 * frozen / n,
            duplex_weights=FP32 * train / n,
            gradients=FP32 * train / n,
            adam_states=2 * FP32 * train / n,
            gathered=BF16 * counts.root + 2 * BF16 * counts.largest_unit,
            **activations,
        ),
        Estimate(
            "ZeRO-2",
            backbone_weights=BF16 * frozen,
            duplex_weights=BF16 * train + FP32 * train / n,
            gradients=BF16 * train / n,
            adam_states=2 * FP32 * train / n,
            gathered=0,
            **activations,
        ),
    ]


def render_markdown(estimates: list[Estimate], counts: ParameterCounts, args: argparse.Namespace) -> str:
    columns = [
        ("backbone weights", "backbone_weights"),
        ("duplex weights", "duplex_weights"),
        ("gradients", "gradients"),
        ("Adam states", "adam_states"),
        ("gathered for compute", "gathered"),
        ("activations, checkpointed", "activations_checkpointed"),
        ("**total, checkpointed**", "total_checkpointed"),
        ("activations, not checkpointed", "activations_not_checkpointed"),
        ("**total, not checkpointed**", "total_not_checkpointed"),
    ]
    lines = [
        f"GiB per GPU: {args.num_gpus} GPUs, micro batch {args.batch}, sequence length {args.seq_len}; "
        f"{counts.frozen:,} frozen and {counts.trainable:,} trainable parameters; FSDP2 root unit "
        f"{counts.root:,}, {counts.units} wrapped units of at most {counts.largest_unit:,}.",
        "",
        "| config | " + " | ".join(name for name, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for e in estimates:
        cells = [f"{getattr(e, attr) / GIB:.2f}" for _, attr in columns]
        cells = [f"**{c}**" if name.startswith("**") else c for (name, _), c in zip(columns, cells, strict=True)]
        lines.append(f"| {e.strategy} (`{STRATEGIES[e.strategy]}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT, help="config.json or the folder holding it")
    parser.add_argument("--fsdp-config", type=Path, default=ROOT / STRATEGIES["FSDP2"], help="FSDP accelerate config")
    parser.add_argument("--num-gpus", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="micro batch per GPU")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    if min(args.num_gpus, args.batch, args.seq_len) < 1:
        parser.error("--num-gpus, --batch and --seq-len must be positive")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config_dir = args.config.parent if args.config.suffix == ".json" else args.config
    config = DuplexConfig.from_pretrained(config_dir)
    counts = count_parameters(config, fsdp_wrap_classes(args.fsdp_config))
    estimates = estimate(counts, config, args.num_gpus, args.batch, args.seq_len)
    result = {
        "setup": {"num_gpus": args.num_gpus, "batch": args.batch, "seq_len": args.seq_len},
        "parameters": asdict(counts),
        "bytes_per_gpu": {
            e.strategy: asdict(e)
            | {"total_checkpointed": e.total_checkpointed, "total_not_checkpointed": e.total_not_checkpointed}
            for e in estimates
        },
    }
    print(json.dumps(result, indent=2) if args.json else render_markdown(estimates, counts, args))
    return result


if __name__ == "__main__":
    main()
