"""Duplex: a frozen decoder-only LM that accepts corrections while it is generating.

Data flow (one forward pass):

    update tokens --embed_tokens--> UpdateEncoder --> Workspace --> workspace versions (B, V, S, D)
        (config.workspace_update: "in_context" keeps each correction's own encoded tokens, "fifo" the newest S
        encoded tokens of the prompt and every correction, "gated" rewrites S learned slots)
    in_context: every version's slots placed after the token where it landed, at in-band positions
        (ContextWorkspace, ContextGeometry); the frozen backbone reads them in context, layer by layer, beside the
        tokens (read_in_context), and the last slot of a landing predicts in place of that token
    fifo / gated: versions --frozen backbone--> per-layer keys/values of the slots, read apart (project_workspace)
    input_ids --embed_tokens--> [decoder layer i whose attention also reads the workspace, gated]* --> lm_head

Every position sees the workspace the updates landed before it made (empty before the first update; in context:
every correction so far, apart: the newest version). Teacher-forced training and step-by-step generation share
this rule (`WorkspaceVersions`) and the single `DuplexForCausalLM.apply_update`; the backbone's token sequence and
KV cache are never rewritten.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half  # Qwen3's are the same
from transformers.utils import cached_file, logging

try:
    from .configuration_duplex import DuplexConfig
    from .generation_duplex import (
        NEVER,
        NO_UPDATE,
        ContextWorkspace,
        DuplexGenerateOutput,
        DuplexGenerationState,
        DuplexUpdate,
        UpdateLanding,
        UpdateStream,
        WorkspaceVersions,
        left_padding,
    )
    from .hub_duplex import ADAPTER_WEIGHTS_NAME, load_backbone, push_folder, save_duplex
    from .updates_duplex import has_updates, refuse_options_with_updates
except ImportError:  # imported as a plain module from a checkout, not through trust_remote_code
    from configuration_duplex import DuplexConfig
    from generation_duplex import (
        NEVER,
        NO_UPDATE,
        ContextWorkspace,
        DuplexGenerateOutput,
        DuplexGenerationState,
        DuplexUpdate,
        UpdateLanding,
        UpdateStream,
        WorkspaceVersions,
        left_padding,
    )
    from hub_duplex import ADAPTER_WEIGHTS_NAME, load_backbone, push_folder, save_duplex
    from updates_duplex import has_updates, refuse_options_with_updates

logger = logging.get_logger(__name__)


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


class Workspace(nn.Module):
    """`num_slots` latent slots in the backbone's embedding space (soft tokens) with a validity mask
    (`workspace_update="fifo"`).

    An update writes its encoded tokens into the newest slots; the oldest slots make room (first in, first out),
    so the latest corrections are always held in full. The workspace starts empty: until the first update the
    adapters read nothing and the model is exactly its backbone."""

    def __init__(self, config: DuplexConfig):
        super().__init__()
        self.num_slots = config.num_slots
        self.hidden_size = config.text_config.hidden_size
        self.max_update_tokens: int | None = config.num_slots  # older tokens would be pushed out by the newest anyway

    brings_prompt = True  # a row's first correction is written with its prompt (`workspace_update_tokens`)

    def initial(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """An empty workspace: slots (B, S, D) and slot mask (B, S)."""
        slots = torch.zeros(batch_size, self.num_slots, self.hidden_size, device=device, dtype=dtype)
        return slots, torch.zeros(batch_size, self.num_slots, dtype=torch.bool, device=device)

    def forward(
        self, slots: torch.Tensor, slot_mask: torch.Tensor, encoded: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the encoded update (B, L, D) behind the valid slots and keep the newest `num_slots`, right-aligned."""
        combined = torch.cat([slots, encoded.to(slots.dtype)], dim=1)  # (B, S+L, D)
        valid = torch.cat([slot_mask, attention_mask.bool()], dim=1)  # (B, S+L)
        order = torch.sort(valid.long(), dim=1, stable=True).indices[:, -self.num_slots :]  # invalid first, in order
        new_slots = combined.gather(1, order[..., None].expand(-1, -1, combined.shape[-1]))
        return new_slots, valid.gather(1, order)


class WorkspaceCrossAttention(DuplexAttention):
    """Multi-head attention from the workspace slots (B, S, D) to an encoded update (B, L, D), without positions:
    the slots are a set of queries, and the order of the update's tokens is the update encoder's to encode (its
    self-attention is rotary)."""

    def forward(self, slots: torch.Tensor, encoded: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """slots (B, S, D), encoded (B, L, D), key_mask bool (B, 1, 1, L) -> (B, S, D)."""
        query = self._split_heads(self.q_proj(slots))  # (B, h, S, hd)
        key = self._split_heads(self.k_proj(encoded))  # (B, h, L, hd)
        value = self._split_heads(self.v_proj(encoded))  # (B, h, L, hd)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask)  # (B, h, S, hd)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class GatedWorkspace(Workspace):
    """`num_slots` learned slots rewritten by every update through a gated residual (`workspace_update="gated"`).

    For the encoded update e (B, L, D) and the current slots W (B, S, D):

        W~ = CrossAttn(W, e, e)           slots query the update's tokens (padding masked out)
        delta = MLP(W~)
        g = sigmoid(Linear([W; W~]))      elementwise gate over the concatenation on the feature axis (2D -> D)
        W_new = W + g * delta

    The workspace starts empty like the fifo one (slot mask all False: the adapters read nothing and the model is
    exactly its backbone); a row's first update starts from the learned slots `W0` (`initial_slots`), and from then
    on all S slots are valid. The slots stay soft tokens in the backbone's embedding space, read through
    `DuplexForCausalLM.project_workspace` exactly as fifo slots are.

    Initialisation (`DuplexPreTrainedModel._init_weights`): `W0` is drawn like token embeddings, normal with the
    standard deviation of the backbone's own input embeddings (so the frozen backbone reads the slots at the scale
    of its tokens), and the MLP's output projection starts at zero, so an untrained write is the identity
    (`W_new = W`, i.e. `W0`): like every duplex block, the rule starts neutral and training opens it. The update
    is read whole (not cut to `num_slots` tokens): the slots summarise it rather than hold its tokens."""

    def __init__(self, config: DuplexConfig):
        super().__init__(config)
        hidden, eps = self.hidden_size, getattr(config.text_config, "rms_norm_eps", 1e-6)
        self.max_update_tokens = None
        self.initial_slots = nn.Parameter(torch.empty(self.num_slots, hidden))  # W0 (S, D)
        self.slot_norm = nn.RMSNorm(hidden, eps=eps)
        self.update_norm = nn.RMSNorm(hidden, eps=eps)
        self.cross_attn = WorkspaceCrossAttention(hidden, config.encoder_heads)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, config.encoder_intermediate_size),
            nn.GELU(),
            ZeroInitLinear(config.encoder_intermediate_size, hidden, bias=False),  # no bias: delta is exactly 0
        )
        self.write_gate = nn.Linear(2 * hidden, hidden)

    def forward(
        self, slots: torch.Tensor, slot_mask: torch.Tensor, encoded: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """slots (B, S, D), slot mask (B, S), encoded update (B, L, D) with its 0/1 mask (B, L) -> the rewritten
        slots (B, S, D), all valid (B, S). Rows whose workspace is still empty start from `W0`."""
        started = slot_mask.any(dim=-1)  # (B,)
        current = torch.where(started[:, None, None], slots, self.initial_slots.to(slots.dtype)[None])  # (B, S, D)
        encoded = encoded.to(slots.dtype)
        read = self.cross_attn(
            self.slot_norm(current), self.update_norm(encoded), attention_mask_to_keys(attention_mask)
        )  # W~ (B, S, D)
        delta = self.mlp(read)  # (B, S, D)
        gate = torch.sigmoid(self.write_gate(torch.cat([current, read], dim=-1)))  # (B, S, D)
        new_slots = (current + gate * delta).to(slots.dtype)
        return new_slots, torch.ones_like(slot_mask, dtype=torch.bool)


class InContextWorkspace(Workspace):
    """Each correction's encoded tokens (the newest `num_slots`), as a version of their own
    (`workspace_update="in_context"`): `DuplexForCausalLM` places every version in the context where its
    correction landed (`ContextWorkspace`), so the prompt is not written (the context holds it). `gate` (zero at
    initialisation) lets a landing's last slot predict in place of the token it follows (`ContextGeometry.read_out`).
    """

    brings_prompt = False

    def __init__(self, config: DuplexConfig):
        super().__init__(config)
        self.gate = nn.Parameter(torch.zeros(1))  # 1-D: FSDP2 shards no scalar parameters

    def is_active(self) -> bool:
        """A closed readout gate changes nothing, unless it is being trained."""
        return gate_is_open(self.gate)

    def forward(
        self, slots: torch.Tensor, slot_mask: torch.Tensor, encoded: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoded update (B, L, D) alone, right-aligned in `num_slots` slots: (B, S, D), mask (B, S)."""
        return super().forward(torch.zeros_like(slots), torch.zeros_like(slot_mask), encoded, attention_mask)


WORKSPACE_CLASSES: dict[str, type[Workspace]] = {
    "fifo": Workspace,
    "gated": GatedWorkspace,
    "in_context": InContextWorkspace,
}


class WorkspaceAdapter(nn.Module):
    """Decoder layer i with its self-attention reading the workspace as extra keys and values (LLaMA-Adapter style).

    The frozen layer's own query attends to its context and to the workspace's keys/values *for that layer*. As if
    the workspace were in the context, it takes its share lambda = Z_ws / (Z_ctx + Z_ws) of the attention (from the
    two log-sum-exps), so a correction can displace what it corrects; a per-head gate tanh(g), zero at
    initialisation, scales that share: out = o_ctx + tanh(g) * lambda * (o_ws - o_ctx). With g = 0 the layer is
    exactly the backbone's (and `_decode` then runs the layer itself). Mirrors `Qwen3DecoderLayer.forward` /
    `LlamaDecoderLayer.forward` of transformers 5.23 (pre-norm attention and MLP blocks)."""

    def __init__(self, config: DuplexConfig):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(config.text_config.num_attention_heads))

    def is_active(self) -> bool:
        """Closed gates (all zero) leave the layer exactly as it is, unless they are being trained."""
        return gate_is_open(self.gate)

    def forward(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        past_key_values,
        workspace_key: torch.Tensor,
        workspace_value: torch.Tensor,
        workspace_mask: torch.Tensor,
    ) -> torch.Tensor:
        """hidden (B, T, D) -> (B, T, D); workspace key/value (B, kv_heads, M, hd), mask bool (B, 1, 1 or T, M)."""
        residual = hidden
        attn = layer.self_attn
        batch, length, _ = hidden.shape
        query, key, value = attention_inputs(attn, layer.input_layernorm(hidden))
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)  # (B, h, T, hd)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, attn.layer_idx)
        context_mask = as_bool_mask(attention_mask, length, key.shape[2], hidden.device)
        out_ctx, lse_ctx = attention_with_lse(query, key, value, context_mask, attn.scaling)
        out_ws, lse_ws = attention_with_lse(
            query, workspace_key.to(query.dtype), workspace_value.to(query.dtype), workspace_mask, attn.scaling
        )
        share = torch.sigmoid((lse_ws - lse_ctx).nan_to_num(nan=float("-inf")))  # (B, h, T, 1): Z_ws/(Z_ctx+Z_ws)
        share = share * torch.tanh(self.gate).to(share.dtype)[:, None, None]
        out = out_ctx + share * (out_ws - out_ctx)
        hidden = residual + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def attention_inputs(attn: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A frozen attention's query, key and value before rotary embedding: normed (B, T, D) -> (B, h, T, hd),
    (B, kv_heads, T, hd), (B, kv_heads, T, hd), as `Qwen3Attention` / `LlamaAttention` compute them."""
    shape = (*normed.shape[:2], -1, attn.head_dim)
    query, key = attn.q_proj(normed).view(shape), attn.k_proj(normed).view(shape)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3
        query, key = attn.q_norm(query), attn.k_norm(key)
    return query.transpose(1, 2), key.transpose(1, 2), attn.v_proj(normed).view(shape).transpose(1, 2)


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding of x (B, h, L, hd) with the backbone's (cos, sin) (B, L, hd). Rotations compose: rotating a
    query already rotated at position i by cos/sin of d gives the query at position i + d."""
    cos, sin = (t[:, None].to(x.dtype) for t in rope)
    return x * cos + rotate_half(x) * sin


def rotate_levels(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B, h, L, hd) rotated by each of several rotations (cos, sin) (B, L, V, hd) -> (B, h, L, V, hd)."""
    cos, sin = (t[:, None].to(x.dtype) for t in rope)
    return x[..., None, :] * cos + rotate_half(x)[..., None, :] * sin


@dataclass
class ContextGeometry:
    """Where an in-context workspace's slots sit among the tokens of one forward pass: exactly where the same text
    would sit in-band. A correction landing at sequence index p (the token whose logits predict the first new token
    it conditions) follows token p; every later token moves behind it by the correction's length. The logits at p
    come from the correction's last slot (`readout`), as in-band they come from the correction's last token.

    Nothing cached is moved: the keys keep the backbone's own positions, and the queries are rotated instead. The
    in-band distance from key j to a reader differs from the backbone's by the slots placed between them, and the
    keys fall into a few *levels* (level l: the keys after the l-th landing point, c_l slots placed before each).
    So each reader gets one rotated copy of its query per level, and one product with the keys scores them all;
    each key's score is taken from its level's copy (`level_scores`)."""

    level_rope: tuple[torch.Tensor, torch.Tensor]  # (B, T, V, hd): token t's query moved by (slots before t) - c_l
    token_levels: torch.Tensor  # (V - 1, B, 1, T, 2, K) bool: whether the copy that scores key j (the backbone's own
    # then the joint one) is at level l + 1 or above; built once per pass for every layer
    slot_level_rope: tuple[torch.Tensor, torch.Tensor] | None  # (B, M_new, V, hd): entering slot m at P_m - c_l
    slot_levels: torch.Tensor | None  # (V - 1, B, 1, M_new, 1, K) bool: key j is at level l + 1 or above
    token_reads: torch.Tensor  # (B, 1, T, M) bool: the slots each token reads (landed before it)
    reads_any: torch.Tensor  # (B, 1, T, 1) bool
    slot_reads: torch.Tensor | None  # (B, 1, M_new, K + M) bool: context up to the landing, earlier slots, itself
    readout: torch.Tensor | None  # (B, T, M_new): token t's logits come from entering slot m (one-hot or none)
    _masks: tuple | None = field(default=None, repr=False)  # (attention mask, its bias): `token_bias`

    @classmethod
    def build(
        cls,
        rotary_emb: nn.Module,
        hidden: torch.Tensor,
        workspace: ContextWorkspace,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_seen: int,
    ) -> ContextGeometry:
        """hidden (B, T, D) of the pass; position_ids (B|1, T) the backbone's RoPE positions of its tokens;
        attention_mask the 2D (B, K) 0/1 mask over every key (None: no padding)."""
        batch, length = hidden.shape[:2]
        num_keys, device = past_seen + length, hidden.device
        starts = workspace.starts  # (B, M) sequence index of each slot's landing (NEVER: unused)
        valid = starts != NEVER
        keys = torch.arange(num_keys, device=device)
        placed_before = starts[:, None, :] < keys[None, :, None]  # (B, K, M): slot m lies before key j in-band
        token_reads = placed_before[:, past_seen:]  # (B, T, M): a token reads what was placed before it
        # the keys' levels: slots placed before each key (nondecreasing along the sequence), numbered 0, 1, ...
        shift = placed_before.sum(-1)  # (B, K)
        level = torch.cat([shift.new_zeros(batch, 1), (shift[:, 1:] != shift[:, :-1]).long()], 1).cumsum(-1)
        num_levels = int(level[:, -1].max()) + 1
        level_shift = shift.new_zeros(batch, num_levels).scatter_reduce(1, level, shift, "amax")  # (B, V): c_l
        token_shift = shift[:, past_seen:]  # (B, T)
        positions = (token_shift[:, :, None] - level_shift[:, None, :]).flatten(1)  # (B, T * V)
        level_rope = tuple(t.unflatten(1, (length, num_levels)) for t in rotary_emb(hidden, positions))
        own = level[:, past_seen:, None].expand(batch, length, num_keys)  # a token's own level: delta 0
        token_levels = torch.stack([own, level[:, None, :].expand(batch, length, num_keys)], dim=2).unsqueeze(1)
        above = torch.arange(1, num_levels, device=device)[:, None, None, None, None, None]  # (V - 1, 1, ..., 1)
        token_levels = token_levels[None] >= above  # (V - 1, B, 1, T, 2, K)

        key_valid = torch.ones(batch, num_keys, dtype=torch.bool, device=device)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            key_valid = attention_mask[:, -num_keys:].bool()
        slot_level_rope = slot_levels = slot_reads = readout = None
        if workspace.num_new:
            new = slice(starts.shape[1] - workspace.num_new, None)
            own_valid, own_start = valid[:, new], torch.where(valid, starts, 0)[:, new]  # (B, M_new)
            rank = (valid.long().cumsum(-1) - valid.long())[:, new]  # valid slots before each (landings in order)
            # right after the token it follows (RoPE skips padding), in order
            own_position = key_valid.long().cumsum(-1).gather(1, own_start) + rank
            own_position = torch.where(own_valid, own_position, 0)
            positions = (own_position[:, :, None] - level_shift[:, None, :]).flatten(1)  # (B, M_new * V)
            slot_level_rope = tuple(t.unflatten(1, (-1, num_levels)) for t in rotary_emb(hidden, positions))
            slot_levels = level[None, :, None, None, None, :] >= above  # (V - 1, B, 1, 1, 1, K)
            slot_levels = slot_levels.expand(-1, -1, -1, workspace.num_new, -1, -1)
            reads_context = (keys[None, None, :] <= own_start[:, :, None]) & key_valid[:, None, :]  # (B, M_new, K)
            order = torch.arange(starts.shape[1], device=device)
            reads_slots = (order[None, :] <= order[new, None])[None] & valid[:, None, :]  # (B, M_new, M)
            slot_reads = (torch.cat([reads_context, reads_slots], dim=-1) & own_valid[:, :, None]).unsqueeze(1)
            # the last slot placed at a landing predicts what comes after it, for the token it follows
            same_landing_later = (own_start[:, None, :] == own_start[:, :, None]) & own_valid[:, None, :]
            same_landing_later &= order[None, new] > order[new, None]  # (B, M_new, M_new)
            last = own_valid & ~same_landing_later.any(-1)  # (B, M_new)
            queries = torch.arange(past_seen, num_keys, device=device)
            readout = (own_start[:, None, :] == queries[None, :, None]) & last[:, None, :]  # (B, T, M_new)
        return cls(
            level_rope=level_rope,
            token_levels=token_levels,
            slot_level_rope=slot_level_rope,
            slot_levels=slot_levels,
            token_reads=token_reads.unsqueeze(1),
            reads_any=token_reads.any(-1)[:, None, :, None],
            slot_reads=slot_reads,
            readout=readout,
        )

    def token_bias(self, attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The tokens' two masks over the context and the slots, as additive biases (B, 1, T, 2, K + M): the
        backbone's own (the context only), then the joint one (the context and the slots they read). Built once per
        pass for the layers that share a mask (adding a bias is several times faster than `masked_fill`)."""
        if self._masks is None or self._masks[0] is not attention_mask or self._masks[1].dtype != dtype:
            _, batch, _, length, _, num_keys = self.token_levels.shape
            context = as_bool_mask(attention_mask, length, num_keys, self.token_reads.device)
            context = context.expand(batch, 1, length, num_keys)
            own = torch.cat([context, torch.zeros_like(self.token_reads)], dim=-1)
            joint = torch.cat([context, self.token_reads], dim=-1)
            visible = torch.stack([own, joint], dim=3)
            bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
            self._masks = (attention_mask, bias.masked_fill_(~visible, torch.finfo(dtype).min))
        return self._masks[1]

    def read_out(self, hidden: torch.Tensor, slots: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D) and the entering slots (B, M_new, D) after the last layer -> hidden where a landing's
        last slot predicts in place of the token it follows: h + tanh(g) (h_slot - h) (g = 0: the backbone's)."""
        if self.readout is None:
            return hidden
        chosen = self.readout.to(hidden.dtype)  # (B, T, M_new) one-hot rows
        from_slot = chosen @ slots  # (B, T, D)
        share = torch.tanh(gate).to(hidden.dtype) * chosen.sum(-1, keepdim=True)  # (B, T, 1)
        return hidden + share * (from_slot - hidden)


def level_scores(copies: torch.Tensor, key: torch.Tensor, levels: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scores over cached keys (B, kv_heads, K, hd), each key read at its level: one product of the queries' rotated
    copies (B, h, T, V, hd) with the keys, then for every (query, key) the copy that `levels` (V - 1, B, 1, T, n, K),
    "at level l + 1 or above", names -> (B, h, T, n, K)."""
    length, num_levels = copies.shape[2:4]
    scores = grouped_scores(copies.flatten(2, 3), key, scaling).unflatten(2, (length, num_levels))  # (B,h,T,V,K)
    picked = scores[:, :, :, :1]  # levels only grow along the keys: a few selections beat a gather
    for level, at_or_above in enumerate(levels, start=1):
        picked = torch.where(at_or_above, scores[:, :, :, level : level + 1], picked)
    return picked.expand(-1, -1, -1, levels.shape[4], -1)


def read_in_context(
    layer: nn.Module,
    gate: torch.Tensor | None,
    hidden: torch.Tensor,
    slots: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    past_key_values,
    workspace: ContextWorkspace,
    geometry: ContextGeometry,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoder layer i with the in-context workspace: hidden (B, T, D) of the tokens, slots (B, M_new, D) entering
    now (or None) -> both after the layer.

    The tokens' attention is the backbone's own (o_ctx) mixed, per head, with the joint attention over the context
    and the slots in their in-band geometry: out = o_ctx + tanh(g) * (o_joint - o_ctx), so closed gates are exactly
    the backbone and open gates read the correction as in-band text would be read. The slots attend, like that
    text, to the context up to their landing and to the slots before them; their keys/values join the workspace.
    Mirrors `Qwen3DecoderLayer.forward` / `LlamaDecoderLayer.forward` of transformers 5.23."""
    attn, index = layer.self_attn, layer.self_attn.layer_idx
    length = hidden.shape[1]
    # the tokens and the entering slots take the layer's projections together: one pass over its weights
    stream = hidden if slots is None else torch.cat([hidden, slots], dim=1)  # (B, T + M_new, D)
    query, key, value = attention_inputs(attn, layer.input_layernorm(stream))
    if slots is not None:
        slot_query, new_key, new_value = query[:, :, length:], key[:, :, length:], value[:, :, length:]
        query, key, value = query[:, :, :length], key[:, :, :length], value[:, :, :length]
    query, key = apply_rotary_pos_emb(query, key, *position_embeddings)  # the backbone's positions
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, index)  # (B, kv_heads, K, hd) at the backbone's positions

    slot_key, slot_value = workspace.keys.get(index), workspace.values.get(index)  # (B, kv_heads, M_old, hd)
    if slots is not None:
        own_rope = tuple(t[:, :, 0] for t in geometry.slot_level_rope)  # level 0: the slots' in-band positions
        new_key = rotate(new_key, own_rope)
        slot_key = new_key if slot_key is None else torch.cat([slot_key, new_key.to(slot_key.dtype)], dim=2)
        slot_value = new_value if slot_value is None else torch.cat([slot_value, new_value.to(slot_value.dtype)], 2)
        workspace.store(index, slot_key, slot_value)
    slot_key, slot_value = slot_key.to(key.dtype), slot_value.to(value.dtype)
    num_context = key.shape[2]

    # the tokens: scores over the context, each key read by the backbone's own query and by the in-band one (level
    # 0's copy is the query at its in-band position, which also reads the slots); one softmax for both, and the
    # mixed weights p_ctx + s (p_joint - p_ctx) take one product with the values
    copies = rotate_levels(query, geometry.level_rope)  # (B, h, T, V, hd)
    scores = level_scores(copies, key, geometry.token_levels, attn.scaling)  # (B, h, T, 2, K)
    slot_scores = grouped_scores(copies[:, :, :, 0], slot_key, attn.scaling)[:, :, :, None]  # (B, h, T, 1, M)
    scores = torch.cat([scores, slot_scores.expand(-1, -1, -1, 2, -1)], dim=-1)
    weights = torch.softmax(scores + geometry.token_bias(attention_mask, scores.dtype), -1)  # (B, h, T, 2, K + M)
    share = hidden.new_zeros(()) if gate is None else torch.tanh(gate)[:, None, None]  # (h, 1, 1)
    share = share.to(weights.dtype) * geometry.reads_any  # (B, h, T, 1): nothing to read, the backbone's own
    mixed = torch.lerp(weights[:, :, :, 0], weights[:, :, :, 1], share)  # (B, h, T, K + M)
    out = grouped_values(mixed[..., :num_context], value) + grouped_values(mixed[..., num_context:], slot_value)
    if slots is not None:  # the entering slots read the context up to their landing, the slots before, themselves
        copies = rotate_levels(slot_query, geometry.slot_level_rope)  # (B, h, M_new, V, hd); level 0: in-band
        context_scores = level_scores(copies, key, geometry.slot_levels, attn.scaling)[:, :, :, 0]  # (B,h,M_new,K)
        scores = torch.cat([context_scores, grouped_scores(copies[:, :, :, 0], slot_key, attn.scaling)], -1)
        weights = masked_softmax(scores, geometry.slot_reads)
        out_slots = grouped_values(weights[..., :num_context], value) + grouped_values(
            weights[..., num_context:], slot_value
        )
        out = torch.cat([out, out_slots], dim=2)  # (B, h, T + M_new, hd)
    stream = stream + attn.o_proj(out.transpose(1, 2).reshape(*stream.shape[:2], -1))
    stream = stream + layer.mlp(layer.post_attention_layernorm(stream))
    return stream[:, :length], None if slots is None else stream[:, length:]


def newest_tokens(ids: torch.Tensor, mask: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) token ids and 0/1 mask -> the newest `limit` valid tokens of each row, right-aligned: (B, <=limit)."""
    if ids.shape[1] <= limit:
        return ids, mask
    order = torch.sort(mask.bool().long(), dim=1, stable=True).indices[:, -limit:]  # padding first, order kept
    return ids.gather(1, order), mask.gather(1, order)


def only_readable_slots(
    workspace_kv: list[tuple[torch.Tensor, torch.Tensor] | None], workspace_mask: torch.Tensor
) -> tuple[list[tuple[torch.Tensor, torch.Tensor] | None], torch.Tensor]:
    """Drop the workspace columns that no position of the chunk reads: the empty version before the first update,
    padding slots, versions that land after the chunk. Masked out everywhere, they add nothing to any attention
    but their cost (a teacher-forced batch holds every version of every row). Keys/values (B, kv_heads, M, hd),
    mask (B, 1, T, M) -> the same with M' <= M columns; (None, None) when no position reads anything."""
    readable = workspace_mask.flatten(0, -2).any(dim=0)  # (M,)
    keep = readable.nonzero()[:, 0]
    if keep.numel() == readable.numel():
        return workspace_kv, workspace_mask
    if keep.numel() == 0:  # nothing readable (no correction yet, or only backchannels): exactly the backbone
        return None, None
    trimmed = [None if kv is None else tuple(t.index_select(2, keep) for t in kv) for kv in workspace_kv]
    return trimmed, workspace_mask.index_select(-1, keep)


@contextmanager
def checkpointing_off(layers: nn.ModuleList) -> Iterator[None]:
    """Run `layers` without gradient checkpointing for a moment (it would drop the KV cache they must fill)."""
    flags = [layer.gradient_checkpointing for layer in layers]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer.gradient_checkpointing = flag


def as_bool_mask(mask: torch.Tensor | None, query_length: int, key_length: int, device: torch.device) -> torch.Tensor:
    """The backbone's prepared attention mask (None: plain causal; bool; or additive float) -> bool (B|1, 1, T, K)."""
    if mask is None:
        offset = key_length - query_length
        keys = torch.arange(key_length, device=device)
        return (keys[None, :] <= offset + torch.arange(query_length, device=device)[:, None])[None, None]
    if mask.dtype == torch.bool:
        return mask[..., -key_length:]
    return mask[..., -key_length:] == 0


def grouped_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention scores with grouped key/value heads, without copying the keys per query head: query (B, h, T, hd),
    key (B, kv_heads, K, hd) -> (B, h, T, K) (query head i reads key head i // (h / kv_heads))."""
    batch, heads, length, head_dim = query.shape
    grouped = query.reshape(batch, key.shape[1], -1, head_dim)  # (B, kv_heads, groups * T, hd)
    return (torch.matmul(grouped, key.transpose(-1, -2)) * scaling).view(batch, heads, length, -1)


def grouped_values(weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weights (B, h, T, K) over value (B, kv_heads, K, hd) -> (B, h, T, hd), grouped as in `grouped_scores`."""
    batch, heads, length, keys = weights.shape
    grouped = weights.reshape(batch, value.shape[1], -1, keys)
    return torch.matmul(grouped, value).view(batch, heads, length, -1)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of the visible scores (bool mask broadcastable to scores). A row with nothing
    visible (a padding position, which nothing reads) gets uniform weights rather than NaN."""
    return torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=-1)


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp: query (B, h, T, hd), key/value (B, kv_heads, K, hd), bool mask
    broadcastable to (B, h, T, K) -> out (B, h, T, hd) (zeros where nothing is visible), lse (B, h, T, 1)."""
    scores = grouped_scores(query, key, scaling).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # -inf where nothing is visible
    weights = torch.exp(scores - lse.clamp_min(torch.finfo(scores.dtype).min)).nan_to_num(0.0)
    return grouped_values(weights, value), lse


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------


def decision_loss(logits: torch.Tensor, is_correction: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of the correction/backchannel decisions: logits, kinds and presence (B, U)."""
    if not present.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[present], is_correction[present].float())


@dataclass
class DuplexCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `update_decision_logits` (B, U): each update's correction (>= 0) or backchannel
    (< 0) decision, in a teacher-forced pass with updates."""

    update_decision_logits: torch.FloatTensor | None = None


class DuplexPreTrainedModel(PreTrainedModel):
    config_class = DuplexConfig
    base_model_prefix = "model"  # the backbone's decoder, as in every *ForCausalLM
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["UpdateEncoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ZeroInitLinear):
            init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (WorkspaceAdapter, InContextWorkspace)):
            init.zeros_(module.gate)
        elif isinstance(module, UpdateDecision):  # its own parameter; its sub-layers are matched as leaves
            init.zeros_(module.query)
        elif isinstance(module, GatedWorkspace):  # its own parameter W0; its sub-layers are matched as leaves
            init.normal_(module.initial_slots, mean=0.0, std=self._token_embedding_std())
        else:
            super()._init_weights(module)

    def _token_embedding_std(self) -> float:
        """Standard deviation of the backbone's input embeddings, the scale at which the backbone reads its tokens.
        Falls back to the backbone's `initializer_range` where the embeddings hold no values yet (meta device,
        sharded)."""
        fallback = getattr(self.config.text_config, "initializer_range", None) or 0.02
        weight = self.get_input_embeddings().weight
        if weight.device.type == "meta" or weight.numel() < 2:
            return fallback
        std = float(weight.detach().float().std())
        return std if math.isfinite(std) and std > 0 else fallback


class DuplexForCausalLM(DuplexPreTrainedModel, GenerationMixin):
    """A frozen causal LM (`model`, `lm_head`) plus the trainable duplex modules: `update_encoder`, `workspace`
    (`Workspace` or `GatedWorkspace`, as `config.workspace_update` says), and `adapters` (one per decoder layer in
    `config.adapter_layers`, keyed by the layer index)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    accepts_loss_kwargs = True

    def __init__(self, config: DuplexConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        if backbone is None:
            self.model = AutoModel.from_config(config.text_config)
            self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        else:  # from_backbone: reuse a loaded causal LM's decoder and head, no copy
            self.model = backbone.get_decoder()
            self.lm_head = backbone.get_output_embeddings()
        self.update_encoder = UpdateEncoder(config)
        self.workspace = WORKSPACE_CLASSES[config.workspace_update](config)
        self.adapters = nn.ModuleDict({str(i): WorkspaceAdapter(config) for i in config.adapter_layers})
        self.post_init()
        self.freeze_backbone()

    # -- PEFT-style bookkeeping ----------------------------------------------------------------------------------------

    def freeze_backbone(self) -> None:
        """Only the duplex modules train; the backbone stays exactly as loaded."""
        self.model.requires_grad_(False)
        self.lm_head.requires_grad_(False)

    def duplex_modules(self) -> dict[str, nn.Module]:
        return {"update_encoder": self.update_encoder, "workspace": self.workspace, "adapters": self.adapters}

    def duplex_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable duplex weights only (what an adapter-only checkpoint stores)."""
        return {
            f"{name}.{key}": tensor
            for name, module in self.duplex_modules().items()
            for key, tensor in module.state_dict().items()
        }

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def get_decoder(self) -> nn.Module:  # transformers' defaults find `model.embed_tokens` and `lm_head`
        return self.model

    def get_base_model(self) -> PreTrainedModel:
        """The frozen backbone as a plain causal LM sharing this model's modules (no copy): the half-duplex
        baseline, and the reference for retention."""
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(self.model.config)
        setattr(base, base.base_model_prefix, self.model)
        base.set_output_embeddings(self.lm_head)
        base.generation_config = self.generation_config
        return base.train(self.training)

    # -- Loading and saving --------------------------------------------------------------------------------------------

    @classmethod
    def from_backbone(
        cls, backbone: str | PreTrainedModel, backbone_kwargs: dict | None = None, **duplex_kwargs
    ) -> DuplexForCausalLM:
        """Wrap a pretrained causal LM (Hub id, local path or loaded model) with fresh duplex modules."""
        if isinstance(backbone, PreTrainedModel):
            name = backbone.config.name_or_path or None
        else:
            name = str(backbone)
            backbone = load_backbone(name, **(backbone_kwargs or {}))
        for tensor in list(backbone.parameters()) + list(backbone.buffers()):
            tensor._is_hf_initialized = True  # post_init must initialise the new modules only
        attn_implementation = backbone.config._attn_implementation  # a composite config resets its sub-configs'
        config = DuplexConfig(
            text_config=backbone.config,
            backbone_name_or_path=name,
            attn_implementation=attn_implementation,
            **duplex_kwargs,
        )
        model = cls(config, backbone=backbone)  # the duplex modules stay fp32 (master weights) whatever the backbone's
        return model.to(device=backbone.device)

    def save_pretrained(self, save_directory, *args, adapter_only: bool = False, push_to_hub: bool = False, **kwargs):
        """A complete Hub repo with its model card; with `adapter_only=True` just config.json + the duplex weights
        (PEFT-style), reloaded by `from_pretrained` on top of `config.backbone_name_or_path`. `push_to_hub=True`
        uploads the folder, weights included, in one commit (hub_duplex.py)."""
        save = partial(super().save_pretrained, *args)
        return save_duplex(self, save_directory, save, adapter_only=adapter_only, push_to_hub=push_to_hub, **kwargs)

    def push_to_hub(self, repo_id: str, *, adapter_only: bool = False, max_shard_size="50GB", tags=None, **hub_kwargs):
        """Save (full, or `adapter_only`) with a model card into a temporary folder and upload it in one commit."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, adapter_only=adapter_only, max_shard_size=max_shard_size, tags=tags)
            return push_folder(folder, repo_id, **hub_kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """A full checkpoint loads as usual; an adapter-only one loads its backbone by name (`config.
        backbone_name_or_path`, or `backbone_name_or_path=` given here: a local copy elsewhere), then the duplex
        weights."""
        path = str(pretrained_model_name_or_path)
        backbone = kwargs.pop("backbone_name_or_path", None)
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        adapter_file = cached_file(
            path, ADAPTER_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs
        )
        if adapter_file is None:  # a full checkpoint: its backbone loads trainable, like any weights
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            model.freeze_backbone()
            return model
        config = kwargs.pop("config", None) or DuplexConfig.from_pretrained(path, **hub_kwargs)
        backbone_kwargs = {k: v for k, v in kwargs.items() if k not in ("trust_remote_code",)}
        duplex_fields = {
            k: getattr(config, k)
            for k in DuplexConfig.__dataclass_fields__
            if k not in ("text_config", "backbone_name_or_path") and k in config.to_diff_dict()
        }
        backbone = backbone or config.backbone_name_or_path
        model = cls.from_backbone(backbone, backbone_kwargs=backbone_kwargs, **duplex_fields)
        state = load_file(adapter_file)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k in model.duplex_state_dict()]
        if missing or unexpected:
            raise ValueError(f"adapter checkpoint {path} does not match: missing {missing}, unexpected {unexpected}")
        return model

    # -- Updates -------------------------------------------------------------------------------------------------------

    def apply_update(
        self,
        slots: torch.Tensor,
        slot_mask: torch.Tensor,
        update_input_ids: torch.Tensor,
        update_attention_mask: torch.Tensor,
        is_correction: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode one update per row, decide whether it is a correction, and write the corrections into the
        workspace: slots (B, S, D), mask (B, S) -> new slots, new mask, decision logits (B,) (>= 0: correction).
        A backchannel leaves its row's workspace as it was. `is_correction` (B,) bool overrides the decision with
        the known kind (teacher-forced training). The only place an update enters the model: training, generation
        and every mode go through here."""
        # fifo keeps only the newest `num_slots` tokens: encoding more would cost O(prompt length) for nothing
        if self.workspace.max_update_tokens is not None:
            update_input_ids, update_attention_mask = newest_tokens(
                update_input_ids, update_attention_mask, self.workspace.max_update_tokens
            )
        embeds = self.model.embed_tokens(update_input_ids)
        encoded = self.update_encoder(embeds.to(slots.dtype), update_attention_mask)
        decision = self.update_encoder.decision(encoded, update_attention_mask)  # (B,)
        write = self.writes(decision, is_correction)
        new_slots, new_mask = self.workspace(slots, slot_mask, encoded, update_attention_mask)
        new_slots = torch.where(write[:, None, None], new_slots, slots)
        new_mask = torch.where(write[:, None], new_mask, slot_mask)
        return new_slots, new_mask, decision

    @staticmethod
    def writes(decision: torch.Tensor, is_correction: torch.Tensor | None = None) -> torch.Tensor:
        """Which updates are written (B,) bool: the known kind where given (teacher forcing), else the decision."""
        return decision >= 0 if is_correction is None else is_correction.bool()

    def workspace_versions(
        self,
        batch_size: int,
        update_input_ids: torch.Tensor | None = None,
        update_attention_mask: torch.Tensor | None = None,
        update_positions: torch.Tensor | None = None,
        update_is_correction: torch.Tensor | None = None,
    ) -> tuple[WorkspaceVersions, torch.Tensor]:
        """Apply a padded batch of updates in order: version 0 is the empty workspace, version u+1 follows update u
        (for the rows where it is a correction: a backchannel's version never becomes visible, so the row goes on
        reading what it read). Returns the versions and the decision logits (B, U)."""
        versions = WorkspaceVersions.empty(*self.empty_workspace(batch_size))
        num_updates = 0 if update_positions is None else update_positions.shape[1]
        slots, slot_mask, _ = versions.latest()
        decisions = []
        for u in range(num_updates):
            has_update = update_positions[:, u] != NO_UPDATE  # (B,)
            known = None if update_is_correction is None else update_is_correction[:, u]
            new_slots, new_mask, decision = self.apply_update(
                slots, slot_mask, update_input_ids[:, u], update_attention_mask[:, u], known
            )
            written = has_update & self.writes(decision, known)
            slots = torch.where(written[:, None, None], new_slots, slots)
            slot_mask = torch.where(written[:, None], new_mask, slot_mask)
            versions = versions.append(slots, slot_mask, torch.where(written, update_positions[:, u], NEVER))
            decisions.append(decision)
        logits = torch.stack(decisions, dim=1) if decisions else torch.zeros(batch_size, 0)
        return versions, logits

    def empty_workspace(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots (B, S, D) and mask (B, S) of an empty workspace, in the update encoder's dtype (fp32 unless cast)."""
        param = next(self.update_encoder.parameters(), self.model.embed_tokens.weight)
        return self.workspace.initial(batch_size, param.device, param.dtype)

    def project_workspace(
        self, slots: torch.Tensor, slot_mask: torch.Tensor, starts: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Each adapted layer's keys/values of workspace versions: slots (B, V, S, D), mask (B, V, S), starts (B, V)
        -> (B, kv_heads, V*S, hd) per adapter, or None for an adapter whose gates are closed (read once here, per
        workspace change, rather than once per layer and decoding step).

        The frozen backbone reads the filled slots as a short text of its own, placed right before the position
        where the version becomes visible, so every layer sees the workspace in its own terms, as it would see the
        same text in-band. Generation calls this once per workspace change: the cost does not depend on the length
        of the context."""
        batch, num_versions, num_slots, hidden = slots.shape
        flat_slots, flat_mask = slots.reshape(-1, num_slots, hidden), slot_mask.reshape(-1, num_slots)
        rows = flat_mask.any(dim=-1).nonzero()[:, 0]  # versions with something to read; empty ones stay masked out
        width = int(flat_mask.sum(dim=-1).max())  # filled slots are right-aligned: only the last `width` are read
        text_config = self.model.config
        num_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        cache = DynamicCache(config=text_config)
        if width:
            offsets = torch.arange(-width, 0, device=slots.device)
            with checkpointing_off(self.model.layers):  # a checkpointed layer would not fill `cache`; S tokens: cheap
                self.model(
                    inputs_embeds=flat_slots[rows, -width:].to(self.model.embed_tokens.weight.dtype),
                    attention_mask=flat_mask[rows, -width:].long(),
                    position_ids=starts.reshape(-1)[rows, None] + offsets,  # the slots end right before the start
                    past_key_values=cache,
                    use_cache=True,
                )
        projected = []
        for key, adapter in self.adapters.items():
            if not adapter.is_active():  # closed gates: the layer runs unchanged, nothing to read
                projected.append(None)
                continue
            layer_kv = []
            for name in ("keys", "values"):
                full = flat_slots.new_zeros(batch * num_versions, num_kv_heads, num_slots, head_dim)
                if width:
                    read = getattr(cache.layers[int(key)], name)  # (rows, kv_heads, width, hd)
                    full = full.to(read.dtype)
                    full[rows, :, num_slots - width :] = read
                full = torch.where(flat_mask[:, None, :, None], full, 0)  # padding slots: zeros, never NaN
                layer_kv.append(full.view(batch, num_versions, num_kv_heads, num_slots, head_dim).transpose(1, 2))
            projected.append(tuple(t.flatten(2, 3) for t in layer_kv))  # (B, kv_heads, V*S, hd)
        return projected

    # -- Forward -------------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        update_input_ids: torch.LongTensor | None = None,
        update_attention_mask: torch.Tensor | None = None,
        update_positions: torch.LongTensor | None = None,
        update_is_correction: torch.Tensor | None = None,
        workspace_kv: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
        workspace_mask: torch.Tensor | None = None,
        context_workspace: ContextWorkspace | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> DuplexCausalLMOutputWithPast:
        r"""
        update_input_ids (`torch.LongTensor` of shape `(batch, num_updates, update_len)`, *optional*):
            Token ids of each row's updates, in order (`pack_updates`).
        update_attention_mask (`torch.Tensor` of shape `(batch, num_updates, update_len)`, *optional*):
            1 for update tokens, 0 for padding.
        update_positions (`torch.LongTensor` of shape `(batch, num_updates)`, *optional*):
            Sequence index from which each update is visible (`update_position(prompt_len, at)`); `NO_UPDATE` pads.
        update_is_correction (`torch.Tensor` of shape `(batch, num_updates)`, *optional*):
            The known kind of each update (True: correction, False: backchannel). Given, it decides which updates are
            written (teacher forcing) and, with `labels`, the decision's cross-entropy joins the loss
            (`config.decision_loss_weight`); otherwise the model's own decisions are used.
        workspace_kv / workspace_mask (*optional*):
            Precomputed adapter keys/values and readable-slot mask; `generate` passes these instead of updates.
        context_workspace (`ContextWorkspace`, *optional*):
            With `workspace_update="in_context"`: the slots placed in the context so far; `generate` passes it
            instead of updates.
        """
        if kwargs.pop("output_attentions", False):
            raise ValueError("DuplexForCausalLM does not support `output_attentions=True`")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.model.config)
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0

        decision_logits = None
        teacher_forced = workspace_kv is None and context_workspace is None and update_positions is not None
        if teacher_forced and update_positions.numel():
            # every workspace version this sequence goes through, each visible from its position on
            versions, decision_logits = self.workspace_versions(
                batch_size, update_input_ids, update_attention_mask, update_positions, update_is_correction
            )
            if self.config.workspace_update == "in_context":  # every correction's slots, placed where it landed
                context_workspace = versions.placed_in_context()
            else:
                padding = left_padding(attention_mask, batch_size, versions.starts.device)
                rope_starts = versions.starts - padding[:, None]  # RoPE positions of the versions' starts
                workspace_kv = self.project_workspace(versions.slots, versions.slot_mask, rope_starts)
                chunk_positions = torch.arange(past_seen, past_seen + seq_len, device=inputs_embeds.device)
                workspace_mask = versions.readable_slots(chunk_positions)
                workspace_kv, workspace_mask = only_readable_slots(workspace_kv, workspace_mask)

        hidden_states, all_hidden = self._decode(
            inputs_embeds,
            attention_mask,
            position_ids,
            past_key_values,
            use_cache,
            workspace_kv,
            workspace_mask,
            context_workspace,
            output_hidden_states,
            **kwargs,
        )
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
            if torch.is_grad_enabled():  # a batch without (read) updates: zero gradient, same graph
                loss = loss + sum(p.sum() for p in self.adapters.parameters()) * 0.0
            if decision_logits is not None and update_is_correction is not None:
                loss = loss + self.config.decision_loss_weight * decision_loss(
                    decision_logits, update_is_correction, update_positions != NO_UPDATE
                )
        return DuplexCausalLMOutputWithPast(
            update_decision_logits=decision_logits,
            loss=loss,
            logits=logits,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden,
        )

    def _decode(
        self,
        inputs_embeds,
        attention_mask,
        position_ids,
        past_key_values,
        use_cache,
        workspace_kv,
        workspace_mask,
        context_workspace=None,
        output_hidden_states=False,
        **kwargs,
    ):
        """The backbone's decoder loop, as in `Qwen3Model.forward` / `LlamaModel.forward` of transformers 5.23,
        with each adapter reading the workspace beside its layer. No workspace (`workspace_kv=None`,
        `context_workspace=None`) or closed gates: the backbone."""
        backbone = self.model
        text_config = backbone.config
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + past_seen
        if isinstance(attention_mask, dict):  # already prepared by generate for a compileable cache
            masks = attention_mask
        else:
            mask_kwargs = {
                "config": text_config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                "past_key_values": past_key_values,
                "position_ids": position_ids,
            }
            masks = {"full_attention": create_causal_mask(**mask_kwargs)}
            layer_types = getattr(text_config, "layer_types", None) or []
            if "sliding_attention" in layer_types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers

        hidden = inputs_embeds
        position_embeddings = backbone.rotary_emb(hidden, position_ids)
        open_adapters = {}  # which adapters read was decided once per workspace change, by `project_workspace`
        if workspace_kv is not None:
            for key, kv in zip(self.adapters.keys(), workspace_kv, strict=True):
                if kv is not None:
                    open_adapters[int(key)] = (self.adapters[key], kv)
        # in_context: the slots pass through every layer beside the tokens (the last one predicts at its landing)
        reads_context, slots, geometry = False, None, None
        if context_workspace is not None and not context_workspace.empty:
            if context_workspace.reads is None:  # once per generation (per pass when teacher-forced)
                gates = [self.workspace, *self.adapters.values()]
                context_workspace.reads = any(module.is_active() for module in gates)
            reads_context = context_workspace.reads
        if reads_context:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            geometry = ContextGeometry.build(
                backbone.rotary_emb, hidden, context_workspace, position_ids, attention_mask, past_seen
            )
            if context_workspace.num_new:
                slots = context_workspace.new_slots.to(hidden.dtype)
        all_hidden = (hidden,) if output_hidden_states else None
        for i, layer in enumerate(backbone.layers[: text_config.num_hidden_layers]):
            if reads_context:
                adapter = self.adapters[str(i)] if str(i) in self.adapters else None
                read = partial(read_in_context, layer, None if adapter is None else adapter.gate)
                if layer.gradient_checkpointing and layer.training:  # as the layer itself would be (no cache)
                    read, past_key_values = partial(layer._gradient_checkpointing_func, read), None
                hidden, slots = read(
                    hidden,
                    slots,
                    masks[layer_types[i]],
                    position_embeddings,
                    past_key_values,
                    context_workspace,
                    geometry,
                )
            elif i in open_adapters:
                adapter, (workspace_key, workspace_value) = open_adapters[i]
                read = partial(adapter, layer)
                if layer.gradient_checkpointing and layer.training:  # as the layer itself would be (no cache)
                    read, past_key_values = partial(layer._gradient_checkpointing_func, read), None
                hidden = read(
                    hidden,
                    masks[layer_types[i]],
                    position_embeddings,
                    past_key_values,
                    workspace_key,
                    workspace_value,
                    workspace_mask,
                )
            else:
                hidden = layer(
                    hidden,
                    attention_mask=masks[layer_types[i]],
                    position_embeddings=position_embeddings,
                    position_ids=position_ids,
                    past_key_values=past_key_values,
                    use_cache=use_cache,
                    **kwargs,
                )
            if output_hidden_states:
                all_hidden += (hidden,)
        if slots is not None:
            hidden = geometry.read_out(hidden, slots, self.workspace.gate)
        if context_workspace is not None:  # (closed gates: nothing reads the slots, nor will in this generation)
            context_workspace.entered()
        return backbone.norm(hidden), all_hidden

    # -- Generation ----------------------------------------------------------------------------------------------------
    # `generate` runs transformers' own decoding loop. It hooks two private GenerationMixin methods:
    # `prepare_inputs_for_generation` (land due updates, hand the adapters their workspace K/V) and
    # `_update_model_kwargs_for_generation` (time-stamp landings, keep in-band insertions in mask and positions).

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config=None,
        updates=None,
        update_mode: str = "workspace",
        tokenizer=None,
        **kwargs,
    ):
        """`GenerationMixin.generate` plus mid-stream corrections.

        updates: None; a list of `(at, text)`, `(at, token_ids)` or `DuplexUpdate` (one list per row for a batch);
            or an `UpdateStream` fed from another thread. An update at `at` conditions new token `at` onwards.
        update_mode: "workspace" (write into the workspace), "ignore" (drop updates: ablation), or "inband"
            (splice `config.inband_template` with the correction into the context, continuing from the same cache).
        With `return_dict_in_generate=True` the output's `update_landings[row]` tells where each update landed.
        """
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "DuplexForCausalLM.generate needs `input_ids` (the prompt is also written into the workspace)"
            )
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("DuplexForCausalLM.generate does not support `inputs_embeds`; pass `input_ids`")
        batch_size = input_ids.shape[0]
        if not has_updates(updates, batch_size, update_mode, tokenizer):  # the backbone's generate, every option
            output = super().generate(inputs, generation_config, tokenizer=tokenizer, **kwargs)
            if isinstance(output, GenerateDecoderOnlyOutput):
                output = DuplexGenerateOutput(**output, update_landings=[[] for _ in range(len(output.sequences))])
            return output
        refuse_options_with_updates(generation_config or self.generation_config, kwargs)
        state = DuplexGenerationState(self, batch_size, updates, update_mode, tokenizer)
        try:
            state.check_decoding_options(generation_config or self.generation_config, kwargs)
            if tokenizer is not None:
                kwargs["tokenizer"] = tokenizer
            output = super().generate(inputs, generation_config, duplex_state=state, **kwargs)
        finally:
            state.close()
        landings = state.finish()
        if isinstance(output, GenerateDecoderOnlyOutput):
            output = DuplexGenerateOutput(**output, update_landings=landings)
        return output

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, duplex_state=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, **kwargs
        )
        if duplex_state is not None:
            duplex_state.prepare_step(input_ids, model_inputs)
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        state = model_kwargs.get("duplex_state")
        if state is not None:
            state.after_forward(model_kwargs)
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)


DuplexConfig.register_for_auto_class()
DuplexForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [  # with the update types users pass to and get back from `generate`
    "DuplexForCausalLM",
    "DuplexPreTrainedModel",
    "DuplexUpdate",
    "UpdateLanding",
    "UpdateStream",
]
