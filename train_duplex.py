"""Train Duplex on the HF Trainer.

    python train_duplex.py                                   # offline default: shipped tiny backbone, 2 CPU cores
    python train_duplex.py --backbone Qwen/Qwen3-1.7B-Base --bf16 --output_dir runs/duplex-1.7b   # the real thing
    python train_duplex.py --method tdm                      # baseline: full fine-tune with in-band corrections
    python train_duplex.py --pretrain_backbone --pretrain_only --output_dir runs/backbone   # re-make the tiny backbone

The offline default loads the frozen tiny backbone shipped in `checkpoints/duplex-tiny-backbone` (what
`--pretrain_backbone` makes: phase 0, a tiny Qwen3 trained on plain answers, turn-based corrections and corrections
given in-band mid-answer), then trains the duplex modules on mid-stream corrections, distractors and several
updates. Every TrainingArguments option is on the command line (`--help`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
    Qwen3ForCausalLM,
    Trainer,
    TrainingArguments,
    set_seed,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbone_shapes import backbone_config
from data import build_byte_tokenizer, build_dataset
from data.collate import IGNORE_INDEX, DuplexCollator, tokenize_row
from data.prompts import PromptFormat
from modeling_duplex import DuplexForCausalLM

logger = logging.getLogger("train_duplex")

SHIPPED_BACKBONE = Path(__file__).resolve().parent / "checkpoints" / "duplex-tiny-backbone"

TINY_DUPLEX = dict(
    num_slots=128,  # byte-level tokens: the prompt and three corrections
    encoder_layers=2,  # identity at init; trained at lr 1e-3 it carries corrections (docs/channel-variants.md)
)


@dataclass
class DuplexArguments:
    """What to train; everything else is a TrainingArguments option."""

    backbone: str | None = field(
        default=None, metadata={"help": "Hub id or local dir; default: the shipped tiny backbone"}
    )
    method: str = field(default="duplex", metadata={"help": "duplex (frozen backbone + workspace) or tdm (baseline)"})
    pretrain_backbone: bool = field(
        default=False, metadata={"help": "phase 0: pretrain the tiny backbone from scratch (about 65 min, 2 CPU cores)"}
    )
    pretrain_only: bool = field(default=False, metadata={"help": "stop after phase 0 (with --pretrain_backbone)"})
    phase0_steps: int = field(default=3000, metadata={"help": "backbone pretraining steps (--pretrain_backbone)"})
    phase0_batch_size: int = field(default=32, metadata={"help": "backbone pretraining batch size"})
    phase0_lr: float = field(default=3e-3, metadata={"help": "backbone pretraining learning rate"})
    duplex_steps: int = field(default=400, metadata={"help": "duplex (or tdm) training steps"})
    distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of KL(in-band teacher || duplex model) on the response tokens, beside cross-entropy: the "
            "frozen backbone given the corrections as text (distractors dropped) teaches what to write after them"
        },
    )
    gate_lr: float = field(
        default=3e-2, metadata={"help": "learning rate of the adapters' zero-initialised gates (LLaMA-Adapter style)"}
    )
    tdm_lr: float = field(default=1e-3, metadata={"help": "learning rate of the tdm baseline's full fine-tune"})
    train_size: int = field(default=20000, metadata={"help": "training instances per phase"})
    families: str | None = field(default=None, metadata={"help": "comma-separated task families (default all)"})
    num_slots: int | None = field(default=None, metadata={"help": "workspace slots (default 32; tiny 128)"})
    encoder_layers: int | None = field(default=None, metadata={"help": "update encoder layers (default 4; tiny 2)"})
    adapter_layers: str | None = field(default=None, metadata={"help": "comma-separated decoder layers (default all)"})
    shots: int = field(
        default=0, metadata={"help": "chat backbones: solved examples per family before each question (few-shot)"}
    )
    eval_per_family: int = field(default=8, metadata={"help": "held-out instances per family and kind at the end"})
    eval_sweep_per_family: int = field(
        default=4, metadata={"help": "held-out instances per family whose correction is swept over every word"}
    )
    skip_eval: bool = field(default=False, metadata={"help": "do not evaluate after training"})


def parse_args(argv: list[str] | None = None) -> tuple[DuplexArguments, TrainingArguments]:
    parser = HfArgumentParser((DuplexArguments, TrainingArguments))
    parser.set_defaults(  # offline-default friendly; every one can be overridden on the command line
        output_dir="runs/duplex-tiny",
        per_device_train_batch_size=16,
        learning_rate=1e-3,  # the update encoder's; at 5e-3 it moved off its identity init and lost the correction
        warmup_steps=20,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=25,
        save_steps=200,
        save_total_limit=2,
        report_to="none",
        remove_unused_columns=False,  # the collator needs the update columns
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=0,
        # DDP: a batch without updates gives the update encoder no gradient (the model adds 0 * gates to the loss,
        # not 0 * encoder), so DDP must look for unused parameters, under activation checkpointing too (the Trainer
        # would turn the search off there; transformers checkpoints non-reentrantly, which allows it).
        ddp_find_unused_parameters=True,
    )
    duplex_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if duplex_args.method not in ("duplex", "tdm"):
        parser.error(f"--method must be 'duplex' or 'tdm', got {duplex_args.method!r}")
    if duplex_args.pretrain_backbone and duplex_args.backbone:
        parser.error("--pretrain_backbone makes the tiny offline backbone; it cannot be combined with --backbone")
    if duplex_args.pretrain_only and not duplex_args.pretrain_backbone:
        parser.error("--pretrain_only needs --pretrain_backbone")
    resume = training_args.resume_from_checkpoint
    if resume is not None and not resumes_last_checkpoint(resume):
        phases = (["phase0"] if duplex_args.pretrain_backbone else []) + [duplex_args.method]
        phase_dirs = [(Path(training_args.output_dir) / name).resolve() for name in phases]
        if not Path(resume).is_dir() or Path(resume).resolve().parent not in phase_dirs:
            parser.error(
                f"--resume_from_checkpoint {resume!r} must be True or a checkpoint-* directory of one of this run's "
                f"phases: {', '.join(str(d) for d in phase_dirs)}"
            )
    return duplex_args, training_args


def tokenized(
    args: DuplexArguments, split_seed: int, n: int, tokenizer, fmt: str, mix: dict | None = None, teacher: bool = False
) -> datasets.Dataset:
    """Instances of the training split, rendered in one of the collator's formats (the backbone's chat template
    where its tokenizer has one)."""
    families = args.families.split(",") if args.families else None
    rows = build_dataset("train", n, seed=split_seed, mix=mix, families=families)
    if fmt == "restart":  # turn-based corrections: single-correction instances only
        rows = rows.filter(lambda r: r["update_kinds"].count("correction") == 1)
    prompt_format = PromptFormat.for_tokenizer(tokenizer, args.shots)
    return rows.map(
        lambda r: tokenize_row(r, tokenizer, fmt, prompt_format, teacher=teacher), remove_columns=rows.column_names
    )


def gated_optimizer(model: torch.nn.Module, args: TrainingArguments, gate_lr: float) -> torch.optim.Optimizer:
    """AdamW with the adapters' gates in a group of their own: zero-initialised scalars that must open far and
    early, so they get a higher learning rate than the rest (as LLaMA-Adapter's gating does)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gates = [p for n, p in trainable if n.endswith(".gate")]
    rest = [p for n, p in trainable if not n.endswith(".gate")]
    groups = [{"params": rest}, {"params": gates, "lr": gate_lr, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )


def distillation_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, teacher_labels: torch.Tensor
) -> torch.Tensor:
    """Mean KL(teacher || student) over the response tokens. Both rows label the same response tokens in the same
    order (`tokenize_row(..., teacher=True)`), so the k-th labelled position of one matches the k-th of the other."""
    student = student_logits[:, :-1][labels[:, 1:] != IGNORE_INDEX].float()  # (tokens, vocab)
    teacher = teacher_logits[:, :-1][teacher_labels[:, 1:] != IGNORE_INDEX].float()
    log_student, log_teacher = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    return torch.nn.functional.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")


class DuplexTrainer(Trainer):
    """The Trainer, with `gated_optimizer` when `gate_lr` is given, and context distillation from the in-band
    teacher when `distill_weight` > 0. The optimizer is built in `create_optimizer`, on the model the Trainer hands
    it, because FSDP refuses a ready-made one (it must see the wrapped parameters)."""

    def __init__(self, *args, gate_lr: float | None = None, distill_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate_lr = gate_lr
        self.distill_weight = distill_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Cross-entropy on the oracle, plus `distill_weight` x KL to the teacher: the same model without updates
        (exactly its frozen backbone) reading the teacher rendering, where the batch carries one."""
        taught = {key: inputs.pop(key) for key in list(inputs) if key.startswith("teacher_")}
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if taught and self.distill_weight:
            with torch.no_grad():
                teacher = model(input_ids=taught["teacher_input_ids"], attention_mask=taught["teacher_attention_mask"])
            kl = distillation_loss(outputs.logits, inputs["labels"], teacher.logits, taught["teacher_labels"])
            loss = loss + self.distill_weight * kl
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.gate_lr is not None and self.optimizer is None:
            self.optimizer = gated_optimizer(self.model if model is None else model, self.args, self.gate_lr)
        return super().create_optimizer(model)


def run_phase(
    model,
    dataset,
    training_args: TrainingArguments,
    name: str,
    steps: int,
    collator,
    tokenizer=None,
    gate_lr: float | None = None,
    distill_weight: float = 0.0,
    **overrides,
):
    """One Trainer run in `output_dir/name`; resumes from that phase's last checkpoint when asked."""
    out = Path(training_args.output_dir) / name
    args = dataclasses.replace(training_args, output_dir=str(out), max_steps=steps, **overrides)
    trainer = DuplexTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        gate_lr=gate_lr,
        distill_weight=distill_weight,
    )
    trainer.train(resume_from_checkpoint=phase_resume_point(training_args.resume_from_checkpoint, out))
    save_loss_curve(trainer.state.log_history, out / "loss.png", name)
    return trainer


def resumes_last_checkpoint(resume: str | None) -> bool:
    return str(resume).lower() in ("true", "1", "yes")


def phase_resume_point(resume: str | None, phase_dir: Path) -> str | bool | None:
    """`--resume_from_checkpoint` for one phase. True: this phase's last checkpoint (a fresh start when it saved
    none). A path: that checkpoint in the phase that saved it; every other phase ignores it, so no phase inherits
    another's step, optimizer or scheduler."""
    if resume is None:
        return None
    if resumes_last_checkpoint(resume):
        return True if list(phase_dir.glob("checkpoint-*")) else None
    return str(resume) if Path(resume).resolve().parent == phase_dir.resolve() else None


def gathered_model(trainer: Trainer, model: PreTrainedModel) -> PreTrainedModel:
    """The trained model, whole, where the main process saves and evaluates it. FSDP leaves every weight sharded
    across the processes: all of them gather the full state dict (a collective) and the main process loads it into
    an unsharded copy. Otherwise the model itself."""
    if not trainer.is_fsdp_enabled:
        return model
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # full tensors, on the main process only
    return duplex_from_state_dict(model.config, state_dict) if trainer.args.should_save else model


def duplex_from_state_dict(config, state_dict: dict[str, torch.Tensor]) -> DuplexForCausalLM:
    """A plain DuplexForCausalLM holding `state_dict`'s tensors as they are (bf16 backbone, fp32 duplex modules)."""
    model = DuplexForCausalLM(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if unexpected or set(missing) - set(model._tied_weights_keys):
        raise ValueError(f"gathered state dict does not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.freeze_backbone()
    return model


def save_loss_curve(log_history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    if not points:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(*zip(*points, strict=True))
    ax.set(xlabel="step", ylabel="training loss", title=title, yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ready_for_generation(model: PreTrainedModel) -> PreTrainedModel:
    """The Trainer turns the KV cache off in the config for training; a saved checkpoint must decode with it."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.use_cache = True
    model.generation_config.use_cache = True
    return model


def pretrain_tiny_backbone(args: DuplexArguments, training_args: TrainingArguments, tokenizer) -> Path:
    """Phase 0: a tiny Qwen3 learns the tasks from plain answers, turn-based corrections (restart format) and
    corrections given in-band mid-answer, so that, like a real pretrained LM, it has seen text change course."""
    out = Path(training_args.output_dir) / "backbone"
    if (out / "config.json").exists():
        logger.info("phase 0: reusing the pretrained backbone in %s", out)
        return out
    config = backbone_config(
        "tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    set_seed(training_args.seed)
    backbone = Qwen3ForCausalLM(config)
    plain = tokenized(args, training_args.seed + 100, args.train_size, tokenizer, "plain")
    restart = tokenized(args, training_args.seed + 101, args.train_size // 2, tokenizer, "restart")
    inband = tokenized(args, training_args.seed + 102, args.train_size, tokenizer, "inband")
    corpus = datasets.concatenate_datasets([plain, restart, inband]).shuffle(seed=training_args.seed)
    run_phase(
        backbone,
        corpus,
        training_args,
        "phase0",
        args.phase0_steps,
        DuplexCollator(tokenizer.pad_token_id),
        tokenizer,
        learning_rate=args.phase0_lr,
        per_device_train_batch_size=args.phase0_batch_size,
        warmup_steps=100,
    )
    ready_for_generation(backbone).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_model(
    args: DuplexArguments, backbone_path: str | Path, offline_default: bool, prompt_format: PromptFormat
) -> PreTrainedModel:
    """Frozen backbone + fresh duplex modules (or, for tdm, the backbone alone, fully trainable)."""
    if args.method == "tdm":
        return AutoModelForCausalLM.from_pretrained(backbone_path)
    duplex_kwargs = dict(TINY_DUPLEX) if offline_default else {}
    duplex_kwargs["inband_template"] = prompt_format.inband_template  # a chat model: a user turn mid-answer
    if args.num_slots is not None:
        duplex_kwargs["num_slots"] = args.num_slots
    if args.encoder_layers is not None:
        duplex_kwargs["encoder_layers"] = args.encoder_layers
    if args.adapter_layers:
        duplex_kwargs["adapter_layers"] = [int(i) for i in args.adapter_layers.split(",")]
    model = DuplexForCausalLM.from_backbone(str(backbone_path), **duplex_kwargs)
    model.print_trainable_parameters()
    return model


def main(argv: list[str] | None = None) -> dict | None:
    args, training_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    datasets.disable_progress_bars()
    out = Path(training_args.output_dir)
    offline_default = args.backbone is None
    if args.pretrain_backbone:
        tokenizer = build_byte_tokenizer()
        backbone_path = pretrain_tiny_backbone(args, training_args, tokenizer)
        if args.pretrain_only:
            return None
    elif offline_default:
        if not (SHIPPED_BACKBONE / "config.json").exists():
            raise SystemExit(f"{SHIPPED_BACKBONE} is missing: pretrain it with --pretrain_backbone")
        tokenizer = AutoTokenizer.from_pretrained(SHIPPED_BACKBONE)
        backbone_path = SHIPPED_BACKBONE
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.backbone)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        backbone_path = args.backbone

    set_seed(training_args.seed)
    prompt_format = PromptFormat.for_tokenizer(tokenizer, args.shots)
    model = build_model(args, backbone_path, offline_default, prompt_format)
    collator = DuplexCollator(tokenizer.pad_token_id)
    if args.method == "tdm":  # same instances and budget as the duplex phase, corrections in the token stream
        data = tokenized(args, training_args.seed + 2, args.train_size, tokenizer, "inband")
        run_phase(model, data, training_args, "tdm", args.duplex_steps, collator, learning_rate=args.tdm_lr)
        if not training_args.should_save:  # multi-process runs: the main process saves (and evaluates), the rest end
            return None
        backbone_path = out / "tdm-backbone"  # the checkpoint names the tuned backbone, not the one it began as
        ready_for_generation(model).save_pretrained(backbone_path)
        tokenizer.save_pretrained(backbone_path)
        # zero-init duplex modules: exactly the tuned backbone
        model = DuplexForCausalLM.from_backbone(model, inband_template=prompt_format.inband_template)
    else:
        teacher = args.distill_weight > 0
        data = tokenized(args, training_args.seed + 2, args.train_size, tokenizer, "duplex", teacher=teacher)
        trainer = run_phase(
            model,
            data,
            training_args,
            "duplex",
            args.duplex_steps,
            collator,
            gate_lr=args.gate_lr,
            distill_weight=args.distill_weight,
        )
        model = gathered_model(trainer, model)
        if not training_args.should_save:  # multi-process runs: the main process saves (and evaluates), the rest end
            return None

    final = out / ("final" if args.method == "duplex" else "tdm-final")  # tdm may share the output dir
    model.config.backbone_name_or_path = str(backbone_path)
    ready_for_generation(model).save_pretrained(final)
    tokenizer.save_pretrained(final)
    logger.info("saved %s", final)
    if training_args.push_to_hub and training_args.hub_model_id:
        model.push_to_hub(training_args.hub_model_id)
        tokenizer.push_to_hub(training_args.hub_model_id)
    if args.method == "tdm":
        logger.info("compare: python eval_duplex.py --checkpoint %s --tdm-checkpoint %s", out / "final", final)
        return None
    if args.skip_eval:
        return None
    import eval_duplex

    model.eval()
    families = args.families.split(",") if args.families else None
    results = eval_duplex.evaluate(
        model,
        tokenizer,
        n_per_family=args.eval_per_family,
        sweep_per_family=args.eval_sweep_per_family,
        families=families,
        shots=args.shots,
    )
    eval_duplex.write_report(results, final / "eval")
    print(eval_duplex.render_markdown(results))
    (final / "eval" / "train_args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    return results


if __name__ == "__main__":
    main()
