"""One training step of Duplex sharded the way `configs/fsdp_1.7b.yaml` shards it, on CPU processes (gloo).

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR

accelerate runs FSDP on GPUs only, so this applies the same sharding by hand: the units come from accelerate's own
auto-wrap policy for the config's `fsdp_transformer_layer_cls_to_wrap` (then the root, as accelerate does), with
FSDP2's bf16 mixed-precision policy over a bf16 backbone and fp32 duplex modules. Every process runs the same batch
(with updates) through the sharded model and through an unsharded copy in bf16, and writes the loss and the full
gradients of the duplex parameters of both to `OUT_DIR/rank{R}.pt`. Then the processes gather the full state dict
as accelerate does, and the main process rebuilds the plain model from it as `train_duplex.py` does before saving.
Not collected by pytest.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data import build_dataset  # noqa: E402
from data.collate import DuplexCollator, tokenize_row  # noqa: E402
from modeling_duplex import DuplexForCausalLM  # noqa: E402
from train_duplex import SHIPPED_BACKBONE, duplex_from_state_dict  # noqa: E402

CONFIG = ROOT / "configs" / "fsdp_1.7b.yaml"


def shard_like_accelerate(model: torch.nn.Module, wrap_classes: str) -> torch.nn.Module:
    """`fully_shard` every module accelerate's TRANSFORMER_BASED_WRAP policy picks, then the root."""
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=wrap_classes.split(",")
    )
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)  # mixed_precision: bf16
    for module in reversed(list(model.modules())):
        if policy(module) and not isinstance(module, FSDPModule):
            fully_shard(module, mp_policy=mp_policy)
    return fully_shard(model, mp_policy=mp_policy)


def duplex_grads(model: DuplexForCausalLM) -> dict[str, torch.Tensor]:
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            grads[name] = grad.detach().float().clone()
    return grads


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    wrap_classes = load_config_from_file(str(CONFIG)).fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    model = DuplexForCausalLM.from_backbone(
        str(SHIPPED_BACKBONE), backbone_kwargs={"dtype": torch.bfloat16}, num_slots=8, encoder_layers=1
    ).train()
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.update_encoder.layers[0].mlp[0].weight.dtype == torch.float32
    with torch.no_grad():  # open the gates a little, so that the workspace moves the loss
        for adapter in model.adapters.values():
            adapter.gate.fill_(0.5)
    reference = copy.deepcopy(model).to(torch.bfloat16)  # what the bf16 mixed-precision policy computes with
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_BACKBONE)
    rows = build_dataset("train", 4, seed=0, mix={"two": 1.0})
    batch = DuplexCollator(tokenizer.pad_token_id)([tokenize_row(r, tokenizer, "duplex") for r in rows])
    assert batch["update_positions"].numel() > 0

    reference_loss = reference(**batch).loss
    reference_loss.backward()
    sharded = shard_like_accelerate(model, wrap_classes)
    loss = sharded(**batch).loss
    loss.backward()
    units = sorted({type(m).__name__ for m in sharded.modules() if isinstance(m, FSDPModule)})
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)  # as accelerate
    gathered = get_model_state_dict(sharded, options=options)  # a collective: every process takes part
    rebuilt = {}
    if dist.get_rank() == 0:  # what train_duplex.py saves after an FSDP run
        whole = duplex_from_state_dict(sharded.config, gathered).eval()
        enc = tokenizer("Name 4 fruits.\n", return_tensors="pt")
        generated = whole.generate(
            **enc, max_new_tokens=8, do_sample=False, updates=[(2, "Name animals instead.")], tokenizer=tokenizer,
            return_dict_in_generate=True,
        )  # fmt: skip
        rebuilt = {
            "weights_equal": all(torch.equal(whole.state_dict()[k], v) for k, v in weights.items()),
            "dtypes": [str(whole.model.embed_tokens.weight.dtype), str(next(whole.adapters.parameters()).dtype)],
            "tied": whole.lm_head.weight is whole.model.embed_tokens.weight,
            "trainable": sorted({n.split(".")[0] for n, p in whole.named_parameters() if p.requires_grad}),
            "landed": generated.update_landings[0][0].applied,
        }
    torch.save(
        {
            "units": units,
            "rebuilt": rebuilt,
            "loss": loss.item(),
            "reference_loss": reference_loss.item(),
            "grads": duplex_grads(sharded),
            "reference_grads": duplex_grads(reference),
        },
        out / f"rank{dist.get_rank()}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
