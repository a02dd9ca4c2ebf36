"""Duplex: a frozen decoder-only LM that accepts corrections while it is generating.

Data flow (one forward pass):

    update tokens --embed_tokens--> UpdateEncoder --> InContextWorkspace --> each correction's slots (B, M, D)
    slots placed in the context where their correction landed, at in-band positions (`ContextWorkspace`)
    input_ids (+ the entering slots) --the backbone's own forward--> lm_head
        every attention call goes through `attention_duplex.duplex_attention_forward`, which runs the backbone's own
        kernel and, in adapted layers, mixes in the joint read of context and slots behind a zero-initialised gate

Every position sees the corrections that landed before it. Teacher-forced training and step-by-step generation
share this rule (`WorkspaceVersions`, `ContextWorkspace`) and the single `DuplexForCausalLM.apply_update`; the
backbone's token sequence and KV cache are never rewritten.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file, logging

try:
    from .attention_duplex import (
        ContextGeometry,
        ContextRead,
        attach_attention,
        check_cache,
        check_implementation,
        readout_hook,
    )
    from .configuration_duplex import DuplexConfig
    from .encoder_duplex import UpdateDecision, UpdateEncoder, ZeroInitLinear, gate_is_open
    from .generation_duplex import (
        NEVER,
        NO_UPDATE,
        ContextWorkspace,
        DuplexGenerationMixin,
        DuplexUpdate,
        UpdateLanding,
        UpdateStream,
        WorkspaceVersions,
    )
    from .hub_duplex import ADAPTER_WEIGHTS_NAME, load_backbone, push_folder, save_duplex
except ImportError:  # imported as a plain module from a checkout, not through trust_remote_code
    from attention_duplex import (
        ContextGeometry,
        ContextRead,
        attach_attention,
        check_cache,
        check_implementation,
        readout_hook,
    )
    from configuration_duplex import DuplexConfig
    from encoder_duplex import UpdateDecision, UpdateEncoder, ZeroInitLinear, gate_is_open
    from generation_duplex import (
        NEVER,
        NO_UPDATE,
        ContextWorkspace,
        DuplexGenerationMixin,
        DuplexUpdate,
        UpdateLanding,
        UpdateStream,
        WorkspaceVersions,
    )
    from hub_duplex import ADAPTER_WEIGHTS_NAME, load_backbone, push_folder, save_duplex

logger = logging.get_logger(__name__)


class InContextWorkspace(nn.Module):
    """Each correction's encoded tokens (the newest `num_slots`), right-aligned in slots of the backbone's embedding
    space: `DuplexForCausalLM` places them in the context where the correction landed (`ContextWorkspace`).
    `gate` (zero at initialisation) lets a landing's last slot predict in place of the token it follows."""

    def __init__(self, config: DuplexConfig):
        super().__init__()
        self.num_slots = config.num_slots
        self.hidden_size = config.text_config.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))  # 1-D: FSDP2 shards no scalar parameters

    def is_active(self) -> bool:
        """A closed readout gate changes nothing, unless it is being trained."""
        return gate_is_open(self.gate)

    def initial(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """An empty workspace: slots (B, S, D) and slot mask (B, S)."""
        slots = torch.zeros(batch_size, self.num_slots, self.hidden_size, device=device, dtype=dtype)
        return slots, torch.zeros(batch_size, self.num_slots, dtype=torch.bool, device=device)

    def forward(self, encoded: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoded update (B, L, D), its newest `num_slots` valid tokens right-aligned: (B, S, D), mask (B, S)."""
        batch = encoded.shape[0]
        slots, slot_mask = self.initial(batch, encoded.device, encoded.dtype)
        combined = torch.cat([slots, encoded], dim=1)  # (B, S + L, D)
        valid = torch.cat([slot_mask, attention_mask.bool()], dim=1)
        order = torch.sort(valid.long(), dim=1, stable=True).indices[:, -self.num_slots :]  # invalid first, in order
        return combined.gather(1, order[..., None].expand(-1, -1, combined.shape[-1])), valid.gather(1, order)

    def read_out(self, hidden: torch.Tensor, slots: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D) of the tokens and (B, M_new, D) of the entering slots after the last layer -> hidden where
        a landing's last slot predicts in place of the token it follows: h + tanh(g) (h_slot - h)."""
        chosen = readout.to(hidden.dtype)  # (B, T, M_new) one-hot rows
        share = torch.tanh(self.gate).to(hidden.dtype) * chosen.sum(-1, keepdim=True)  # (B, T, 1)
        return hidden + share * (chosen @ slots - hidden)


class WorkspaceAdapter(nn.Module):
    """The gate of one adapted layer: per head, how much of the joint read of context and workspace replaces the
    backbone's own attention (out = o_ctx + tanh(g) (o_joint - o_ctx); `attention_duplex`). Zero at
    initialisation: the layer is exactly the backbone's."""

    def __init__(self, config: DuplexConfig):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(config.text_config.num_attention_heads))

    def is_active(self) -> bool:
        """Closed gates (all zero) leave the layer exactly as it is, unless they are being trained."""
        return gate_is_open(self.gate)


def newest_tokens(ids: torch.Tensor, mask: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) token ids and 0/1 mask -> the newest `limit` valid tokens of each row, right-aligned: (B, <=limit)."""
    if ids.shape[1] <= limit:
        return ids, mask
    order = torch.sort(mask.bool().long(), dim=1, stable=True).indices[:, -limit:]  # padding first, order kept
    return ids.gather(1, order), mask.gather(1, order)


def check_backbone(decoder: nn.Module) -> None:
    """Refuse, naming what is missing, a backbone the read cannot attach to: it needs rotary positions and a final
    norm on its decoder, and layers whose attention goes through transformers' attention interface."""
    for name in ("rotary_emb", "norm", "layers"):
        if not hasattr(decoder, name):
            raise ValueError(
                f"Duplex needs a decoder-only backbone with rotary positions; {type(decoder).__name__} has no `{name}`"
            )


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
    """What every Duplex model shares with transformers and PEFT: initialisation, the frozen backbone's bookkeeping,
    loading (full, adapter-only, around a pretrained backbone) and saving."""

    config_class = DuplexConfig
    base_model_prefix = "model"  # the backbone's decoder, as in every *ForCausalLM
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # eager and SDPA are tested with corrections (flex, flash: see `attention_duplex`)
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
        else:
            super()._init_weights(module)

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


class DuplexForCausalLM(DuplexPreTrainedModel, DuplexGenerationMixin):
    """A frozen causal LM (`model`, `lm_head`) plus the trainable duplex modules: `update_encoder`, `workspace`
    (the readout gate) and `adapters` (one gate per decoder layer in `config.adapter_layers`, keyed by the layer
    index). The backbone runs its own forward; the duplex read enters through its attention interface."""

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
        check_backbone(self.model)
        self.workspace = InContextWorkspace(config)
        self.adapters = nn.ModuleDict({str(i): WorkspaceAdapter(config) for i in config.adapter_layers})
        self.post_init()
        self.freeze_backbone()
        attach_attention(self.model.config)

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
        update_input_ids, update_attention_mask = newest_tokens(
            update_input_ids, update_attention_mask, self.workspace.num_slots
        )
        embeds = self.model.embed_tokens(update_input_ids)
        encoded = self.update_encoder(embeds.to(slots.dtype), update_attention_mask)
        decision = self.update_encoder.decision(encoded, update_attention_mask)  # (B,)
        write = self.writes(decision, is_correction)
        new_slots, new_mask = self.workspace(encoded.to(slots.dtype), update_attention_mask)
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
        (for the rows where it is a correction: a backchannel's version is never placed). Returns the versions and
        the decision logits (B, U)."""
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

    def reads_workspace(self) -> bool:
        """Whether any gate is open (or being trained): with every gate closed the model is exactly its backbone,
        and a pass need not carry the slots at all."""
        return any(module.is_active() for module in (self.workspace, *self.adapters.values()))

    def context_read(
        self, workspace: ContextWorkspace | None, like: torch.Tensor, attention_mask, past_seen: int
    ) -> ContextRead | None:
        """What this pass's attention needs to read `workspace` (None: nothing to read, exactly the backbone)."""
        if workspace is None or workspace.empty:
            return None
        if workspace.reads is None:  # decided once per generation (per pass when teacher-forced)
            workspace.reads = self.reads_workspace()
        if not workspace.reads:
            workspace.entered()
            return None
        check_implementation(self.model.config)
        if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.dim() != 2):
            raise ValueError("corrections need a 2D `attention_mask` (batch, keys) or None, not prepared 4D masks")
        geometry = ContextGeometry.build(
            self.model.rotary_emb, like, workspace, attention_mask, past_seen, like.shape[1]
        )
        gates = {int(i): adapter.gate for i, adapter in self.adapters.items()}
        return ContextRead(workspace, geometry, gates, like.shape[1])

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
        context_workspace: ContextWorkspace | None = None,
        **kwargs,
    ) -> DuplexCausalLMOutputWithPast:
        r"""
        update_input_ids / update_attention_mask (`(batch, num_updates, update_len)`, *optional*):
            Token ids of each row's updates, in order, and their 0/1 mask (`pack_updates`).
        update_positions (`torch.LongTensor` of shape `(batch, num_updates)`, *optional*):
            Sequence index from which each update is visible (`update_position(prompt_len, at)`); `NO_UPDATE` pads.
        update_is_correction (`torch.Tensor` of shape `(batch, num_updates)`, *optional*):
            The known kind of each update (True: correction, False: backchannel). Given, it decides which updates are
            written (teacher forcing) and, with `labels`, the decision's cross-entropy joins the loss
            (`config.decision_loss_weight`); otherwise the model's own decisions are used.
        context_workspace (`ContextWorkspace`, *optional*):
            The slots placed in the context so far; `generate` passes it instead of updates.
        """
        if kwargs.get("output_attentions"):
            raise ValueError("DuplexForCausalLM does not support `output_attentions=True`")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`")
        attach_attention(self.model.config)  # again, in case the attention implementation was set since
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]
        use_cache = use_cache if use_cache is not None else self.model.config.use_cache
        return_dict = kwargs.pop("return_dict", None)
        hidden_wanted = kwargs.pop("output_hidden_states", None)
        hidden_wanted = self.config.output_hidden_states if hidden_wanted is None else hidden_wanted
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.model.config)
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0

        decision_logits = None
        if context_workspace is None and update_positions is not None and update_positions.numel():
            versions, decision_logits = self.workspace_versions(
                batch_size, update_input_ids, update_attention_mask, update_positions, update_is_correction
            )
            context_workspace = versions.placed_in_context()  # every correction's slots, placed where it landed
        read = self.context_read(context_workspace, inputs_embeds, attention_mask, past_seen)
        if read is not None and read.num_entering:
            check_cache(past_key_values)
            inputs_embeds, attention_mask, position_ids = self.with_entering_slots(
                read, inputs_embeds, attention_mask, position_ids, past_seen
            )
        with readout_hook(self.model.norm, self.workspace, read):
            outputs = self.model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                output_hidden_states=hidden_wanted,
                duplex_read=read,
                **kwargs,
            )
        if read is not None:
            if read.num_entering and past_key_values is not None:
                past_key_values.crop(-read.num_entering)  # the slots' keys/values live in the workspace, not here
            read.workspace.entered()
        hidden_states = outputs.last_hidden_state[:, :seq_len]
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
        all_hidden = None if outputs.hidden_states is None else tuple(h[:, :seq_len] for h in outputs.hidden_states)
        output = DuplexCausalLMOutputWithPast(
            update_decision_logits=decision_logits,
            loss=loss,
            logits=logits,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden,
        )
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()

    def with_entering_slots(
        self, read: ContextRead, inputs_embeds: torch.Tensor, attention_mask, position_ids, past_seen: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The pass's inputs with the entering slots after the tokens, at their in-band positions: they travel
        through the backbone's layers beside the tokens (`ContextRead.attend` keeps them apart)."""
        batch, length = inputs_embeds.shape[:2]
        slots = read.workspace.new_slots.to(inputs_embeds.dtype)
        if position_ids is None:
            position_ids = torch.arange(past_seen, past_seen + length, device=inputs_embeds.device)[None]
        position_ids = torch.cat([position_ids.expand(batch, -1), read.geometry.slot_positions], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, slots.shape[1])], dim=1)
        return torch.cat([inputs_embeds, slots], dim=1), attention_mask, position_ids


DuplexConfig.register_for_auto_class()
DuplexForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [  # with the update types users pass to and get back from `generate`
    "DuplexForCausalLM",
    "DuplexPreTrainedModel",
    "DuplexUpdate",
    "UpdateLanding",
    "UpdateStream",
]
