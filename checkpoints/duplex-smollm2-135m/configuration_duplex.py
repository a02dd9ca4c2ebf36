"""Configuration of Duplex: a frozen decoder-only backbone plus an update encoder, a latent workspace and
zero-gated workspace adapters, so that corrections can arrive while the model is generating."""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

WORKSPACE_UPDATES = ("in_context",)  # how an update is written into the workspace (`workspace_update`)


class DuplexConfig(PreTrainedConfig):
    r"""
    Configuration for [`DuplexForCausalLM`].

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the frozen decoder-only backbone (Qwen3 by default; any HF decoder-only config whose
            base model has `embed_tokens`, `layers`, `norm` and `rotary_emb`, e.g. Llama).
        backbone_name_or_path (`str`, *optional*):
            Hub id or local path of the pretrained backbone. Adapter-only checkpoints load the backbone from here.
        num_slots (`int`, defaults to 32):
            Number of workspace slots (soft tokens of the backbone's hidden size). With `workspace_update="in_context"`
            it bounds the tokens of one correction (the newest are kept); with `"fifo"` how much correction text is
            held at once; with `"gated"` it is the number of learned slots.
        workspace_update (`str`, defaults to `"in_context"`):
            How an update is written into the workspace. `"in_context"`: each correction's encoded tokens are placed
            in the context where the correction landed, at the positions its text would take in-band, and the
            frozen backbone reads them there, after the answer so far; each adapted layer mixes that reading with its
            own under its gate, and a readout gate lets the correction's last slot predict the next token, so closed
            gates are exactly the backbone and open gates with the identity encoder are exactly in-band. `"fifo"`:
            the encoded tokens go into the newest of `num_slots` slots, the oldest make room, and the backbone reads
            the slots apart from the context. `"gated"`: `num_slots` learned slots `W0` (from the first update on)
            are rewritten by every update `e`: `W~ = CrossAttn(W, e, e)`, `delta = MLP(W~)`,
            `g = sigmoid(Linear([W; W~]))`, `W_new = W + g * delta`. Every rule leaves the workspace empty until the
            first update.
        encoder_layers (`int`, defaults to 4):
            Layers of the bidirectional update encoder (each starts as the identity).
        encoder_heads (`int`, *optional*):
            Attention heads of the update encoder. Defaults to the backbone's.
        encoder_intermediate_size (`int`, *optional*):
            MLP width of the update encoder. Defaults to twice the hidden size.
        adapter_layers (`list[int]`, *optional*):
            Indices of the decoder layers that read the workspace through their own attention. `None` means all.
        decision_loss_weight (`float`, defaults to 1.0):
            Weight of the update decision's cross-entropy (correction or backchannel, from the update encoder) in
            the training loss, when the batch carries each update's kind (`update_is_correction`).
        inband_template (`str`, defaults to `"\n{text}\n"`):
            How a correction is spliced into the token stream by the `update_mode="inband"` baseline.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the update encoder's initial weights.
    """

    model_type = "duplex"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3")}

    text_config: dict | PreTrainedConfig | None = None
    backbone_name_or_path: str | None = None
    num_slots: int = 32
    workspace_update: str = "in_context"
    encoder_layers: int = 4
    encoder_heads: int | None = None
    encoder_intermediate_size: int | None = None
    adapter_layers: list[int] | None = None
    decision_loss_weight: float = 1.0
    inband_template: str = "\n{text}\n"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        backbone = self.text_config
        # The backbone decides whether lm_head and embed_tokens share weights.
        self.tie_word_embeddings = bool(getattr(backbone, "tie_word_embeddings", False))
        if self.encoder_heads is None:
            self.encoder_heads = backbone.num_attention_heads
        if self.encoder_intermediate_size is None:
            self.encoder_intermediate_size = 2 * backbone.hidden_size
        if self.adapter_layers is None:
            self.adapter_layers = list(range(backbone.num_hidden_layers))
        self.adapter_layers = sorted(int(i) for i in self.adapter_layers)
        self._validate_duplex_fields(backbone.hidden_size, backbone.num_hidden_layers)

    def _validate_duplex_fields(self, hidden: int, num_layers: int) -> None:
        """Fail at construction, naming the field, rather than deep inside a forward pass."""
        if self.num_slots < 1:
            raise ValueError(f"`num_slots` must be >= 1, got {self.num_slots}")
        if self.workspace_update not in WORKSPACE_UPDATES:
            raise ValueError(f"`workspace_update` must be one of {WORKSPACE_UPDATES}, got {self.workspace_update!r}")
        if hidden % self.encoder_heads:
            raise ValueError(f"`encoder_heads`={self.encoder_heads} must divide the hidden size {hidden}")
        bad = [i for i in self.adapter_layers if not 0 <= i < num_layers]
        if bad or len(set(self.adapter_layers)) != len(self.adapter_layers):
            raise ValueError(
                f"`adapter_layers` must be distinct indices in [0, {num_layers}), got {self.adapter_layers}"
            )
        if "{text}" not in self.inband_template:
            raise ValueError(f"`inband_template` must contain '{{text}}', got {self.inband_template!r}")


__all__ = ["WORKSPACE_UPDATES", "DuplexConfig"]
