"""The update encoder: a small bidirectional transformer over the backbone's token embeddings that encodes each
update, and the decision whether it is a correction or a backchannel. Every block starts as the identity, so an
untrained encoder hands the backbone the correction's own embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:
    from .configuration_duplex import DuplexConfig
except ImportError:  # imported as a plain module from a checkout
    from configuration_duplex import DuplexConfig


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


def gate_is_open(gate: nn.Parameter) -> bool:
    """A zero-initialised gate changes its output only when some entry is non-zero, or while it is being trained."""
    return bool(gate.detach().any()) or (gate.requires_grad and torch.is_grad_enabled())


class ZeroInitLinear(nn.Linear):
    """A Linear layer that `_init_weights` sets to zero (weight and bias): the output projections of the update
    encoder's blocks, so that each starts as the identity."""


def rotate_half_positions(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding over the sequence axis of x (B, h, L, hd); relative, so left padding is harmless."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
    angles = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)[:, None] * inv_freq  # (L, half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class DuplexAttention(nn.Module):
    """Multi-head attention from queries (B, T, D) to a memory (B, M, D), used by the update encoder."""

    def __init__(self, hidden_size: int, num_heads: int, zero_init_output: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = (ZeroInitLinear if zero_init_output else nn.Linear)(hidden_size, hidden_size, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, L, hd)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Bidirectional self-attention with rotary positions (order matters: "Spell cat" != "Spell act")."""
        query = rotate_half_positions(self._split_heads(self.q_proj(hidden)))
        key = rotate_half_positions(self._split_heads(self.k_proj(hidden)))
        out = F.scaled_dot_product_attention(query, key, self._split_heads(self.v_proj(hidden)), attn_mask=key_mask)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class UpdateEncoderLayer(nn.Module):
    """Pre-norm bidirectional transformer layer whose output projections start at zero (identity at init)."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, eps: float):
        super().__init__()
        self.attn_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.self_attn = DuplexAttention(hidden_size, num_heads, zero_init_output=True)
        self.mlp_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, intermediate_size), nn.GELU(), ZeroInitLinear(intermediate_size, hidden_size)
        )

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.attn_norm(hidden), key_mask)
        return hidden + self.mlp(self.mlp_norm(hidden))


class UpdateEncoder(nn.Module):
    """Residual bidirectional transformer over the backbone's (frozen) token embeddings of a correction.

    Every block starts as the identity, so at initialisation a correction enters the workspace as its own token
    embeddings, which the backbone reads exactly as it would read the correction in-band; training refines them."""

    def __init__(self, config: DuplexConfig):
        super().__init__()
        backbone_config = config.text_config
        eps = getattr(backbone_config, "rms_norm_eps", 1e-6)
        self.layers = nn.ModuleList(
            UpdateEncoderLayer(backbone_config.hidden_size, config.encoder_heads, config.encoder_intermediate_size, eps)
            for _ in range(config.encoder_layers)
        )

        self.decision = UpdateDecision(backbone_config.hidden_size, eps)

    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """embeds (B, L, D), attention_mask (B, L) -> encoded (B, L, D), in the backbone's embedding space."""
        key_mask = attention_mask_to_keys(attention_mask)
        hidden = embeds
        for layer in self.layers:
            hidden = layer(hidden, key_mask)
        return hidden


class UpdateDecision(nn.Module):
    """Is an update a correction or a backchannel (`ok`, `mm-hmm`)? DUO's state output, read off the encoded update:
    attention pooling with a learned query, then one logit (>= 0: correction). A backchannel leaves the workspace as
    it was (`DuplexForCausalLM.apply_update`). At initialisation the query and the logit are zero: uniform pooling,
    and every update counts as a correction."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.query = nn.Parameter(torch.zeros(hidden_size))
        self.classifier = ZeroInitLinear(hidden_size, 1)

    def forward(self, encoded: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """encoded (B, L, D), attention_mask (B, L) -> decision logits (B,)."""
        hidden = self.norm(encoded)
        scores = (hidden @ self.query.to(hidden.dtype)) / math.sqrt(hidden.shape[-1])  # (B, L)
        scores = scores.masked_fill(~attention_mask.bool(), float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row without tokens pools nothing
        pooled = torch.einsum("bl,bld->bd", weights, hidden)
        return self.classifier(pooled).squeeze(-1).float()


def attention_mask_to_keys(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B, 1, 1, L) bool key mask; a row with no valid key attends to all (avoids NaN)."""
    keys = attention_mask.bool()
    keys = keys | ~keys.any(dim=-1, keepdim=True)
    return keys[:, None, None, :]
