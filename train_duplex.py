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
import hashlib
import json
import logging
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    LogitsProcessorList,
    PreTrainedModel,
    Qwen3ForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbone_shapes import backbone_config
from data import FAMILIES, LANDINGS, MIX_KINDS, build_byte_tokenizer, build_dataset
from data.collate import IGNORE_INDEX, DuplexCollator, tokenize_row
from data.own_answers import PrefixForcing, own_answer_rows
from data.prompts import PromptFormat
from generation_duplex import NO_UPDATE, pack_updates, update_position
from hub_duplex import build_model_card, push_folder
from modeling_duplex import DuplexForCausalLM

logger = logging.getLogger("train_duplex")

SHIPPED_BACKBONE = Path(__file__).resolve().parent / "checkpoints" / "duplex-tiny-backbone"

TINY_DUPLEX = dict(
    num_slots=128,  # byte-level tokens: the prompt and three corrections
    encoder_layers=2,  # identity at init; trained at lr 1e-3 it carries corrections (docs/channel-variants.md)
)


# The duplex phase's rows: every row carries an update, landing at any kind of point in the text. A row without one
# leaves the workspace empty, so the model is exactly its frozen backbone there and the duplex modules get no gradient
# from it (retention holds by construction).
DUPLEX_MIX = {"one": 0.6, "distractor": 0.15, "two": 0.19, "three": 0.06}


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
    phase0_init: str | None = field(
        default=None,
        metadata={
            "help": "continue phase 0 from this backbone's weights (e.g. checkpoints/duplex-tiny-backbone) instead of "
            "a fresh init: a long pretraining run built in pieces"
        },
    )
    phase0_family_weights: str | None = field(
        default=None,
        metadata={"help": "phase 0's data mixture, e.g. 'add=4,case=2' (families not named weigh 1)"},
    )
    phase0_landing_weights: str | None = field(
        default=None,
        metadata={
            "help": "where phase 0's in-band corrections land, e.g. 'in_word=4,after_space=2' (kinds not named "
            "weigh 1; default: every kind the same)"
        },
    )
    phase0_bf16: bool | None = field(
        default=None,
        metadata={
            "help": "phase 0 under bf16 autocast (fp32 master weights); False: fp32; default: bf16 where the device "
            "computes it natively (a GPU, a CPU with AVX-512 BF16 or AMX), fp32 elsewhere (emulated bf16 is slower)"
        },
    )
    phase0_eval_steps: int = field(
        default=500, metadata={"help": "phase 0: held-out greedy accuracy per family every N steps (0: never)"}
    )
    phase0_eval_per_family: int = field(
        default=4, metadata={"help": "phase 0's curves: instances per family and kind, on each held-out split"}
    )
    duplex_steps: int = field(default=800, metadata={"help": "duplex (or tdm) training steps"})
    distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of KL(in-band teacher || duplex model) on the response tokens, beside cross-entropy: the "
            "frozen backbone given the corrections as text (distractors dropped) teaches what to write after them"
        },
    )
    onpolicy_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of on-policy distillation (GKD): after its update the model writes its own continuation "
            "(greedy), the frozen backbone given the same correction in-band scores those very tokens, and "
            "KL(teacher || model) on them joins the loss"
        },
    )
    onpolicy_rows: int = field(default=8, metadata={"help": "rows of each batch rolled out for on-policy distillation"})
    gate_lr: float = field(
        default=3e-2, metadata={"help": "learning rate of the adapters' zero-initialised gates (LLaMA-Adapter style)"}
    )
    encoder_lr: float | None = field(
        default=None,
        metadata={"help": "learning rate of the update encoder's layers (default: --learning_rate, as the rest)"},
    )
    tdm_lr: float = field(default=1e-3, metadata={"help": "learning rate of the tdm baseline's full fine-tune"})
    train_size: int = field(default=20000, metadata={"help": "training instances per phase"})
    families: str | None = field(default=None, metadata={"help": "comma-separated task families (default all)"})
    duplex_mix: str | None = field(
        default=None,
        metadata={
            "help": "the duplex phase's kinds of instance, e.g. 'one=5,two=3,three=1,distractor=1' (kinds not named "
            "weigh 0; default: " + ",".join(f"{kind}={weight}" for kind, weight in DUPLEX_MIX.items()) + ")"
        },
    )
    num_slots: int | None = field(default=None, metadata={"help": "workspace slots (default 32; tiny 128)"})
    encoder_layers: int | None = field(default=None, metadata={"help": "update encoder layers (default 4; tiny 2)"})
    adapter_layers: str | None = field(default=None, metadata={"help": "comma-separated decoder layers (default all)"})
    shots: int = field(
        default=0, metadata={"help": "chat backbones: solved examples per family before each question (few-shot)"}
    )
    own_answers: bool = field(
        default=False,
        metadata={
            "help": "chat backbones: train on the frozen backbone's own answers instead of the families' oracles (its "
            "answer up to each landing, then its answer to the corrected question, kept where the family's rule "
            "accepts it; data/own_answers.py), written once before training and cached in output_dir"
        },
    )
    own_answer_tokens: int = field(
        default=48, metadata={"help": "--own_answers: answer tokens per row (the evaluation's --max-new-tokens)"}
    )
    own_answer_samples: int = field(
        default=2, metadata={"help": "--own_answers: sampled answers tried where the greedy ones fail the rule"}
    )
    own_answer_afresh: str = field(
        default="first",
        metadata={
            "help": "--own_answers: where the backbone's answer asked afresh after a correction (it restarts the "
            "answer from its first line mid-text) comes among the candidates: first (before sampled goings-on), "
            "last (only where no going-on passes) or never (only answers that go on; rows none passes are dropped)",
            "choices": ["first", "last", "never"],
        },
    )
    own_answer_channel: str | None = field(
        default=None,
        metadata={
            "help": "--own_answers: a trained Duplex checkpoint on this backbone (an adapter-only one loads onto "
            "--backbone) whose own answers through its channel (greedy, then sampled) are tried first, kept where "
            "the rule accepts them and they join cleanly: a round of self-training on what it gets right"
        },
    )
    eval_per_family: int = field(default=8, metadata={"help": "held-out instances per family and kind at the end"})
    curve_steps: int = field(
        default=0,
        metadata={"help": "duplex phase: held-out greedy revision (workspace; in-band once) every N steps (0: never)"},
    )
    curve_per_family: int = field(default=4, metadata={"help": "instances per family and kind of those curves"})
    eval_sweep_per_family: int = field(
        default=1,
        metadata={"help": "held-out instances per family whose correction is swept over every point where it can land"},
    )
    skip_eval: bool = field(default=False, metadata={"help": "do not evaluate after training"})

    @property
    def family_names(self) -> list[str] | None:
        """`--families` as a list (None: every family)."""
        return self.families.split(",") if self.families else None

    @property
    def duplex_mix_weights(self) -> dict[str, float]:
        """`--duplex_mix` as weights of `MIX_KINDS` (unset: `DUPLEX_MIX`)."""
        return parse_weights(self.duplex_mix, list(MIX_KINDS), "--duplex_mix") or DUPLEX_MIX


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
        train_sampling_strategy="group_by_length",  # batches of similar length: half the padding (bench_pretrain.py)
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
    if duplex_args.own_answers and (duplex_args.backbone is None or duplex_args.method != "duplex"):
        parser.error("--own_answers needs --backbone (a chat model) and --method duplex")
    if duplex_args.own_answer_channel and not duplex_args.own_answers:
        parser.error("--own_answer_channel needs --own_answers")
    if duplex_args.pretrain_only and not duplex_args.pretrain_backbone:
        parser.error("--pretrain_only needs --pretrain_backbone")
    try:
        parse_weights(duplex_args.duplex_mix, list(MIX_KINDS), "--duplex_mix")
    except ValueError as err:
        parser.error(str(err))
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
    args: DuplexArguments,
    split_seed: int,
    n: int,
    tokenizer,
    fmt: str,
    mix: dict | None = None,
    teacher: bool = False,
    family_weights: dict[str, float] | None = None,
    landing: str = "before_space",
    answers_by: PreTrainedModel | None = None,
    cache_dir: Path | None = None,
) -> datasets.Dataset:
    """Instances of the training split, rendered in one of the collator's formats (the backbone's chat template
    where its tokenizer has one); `landing`: where their updates land (`build_dataset`). With `answers_by` (the
    frozen backbone), its own answers replace the oracles' (`own_answer_rows`), cached in `cache_dir`."""
    rows = build_dataset(
        "train",
        n,
        seed=split_seed,
        mix=mix,
        families=args.family_names,
        family_weights=family_weights,
        landing=landing,
    )
    if fmt == "restart":  # turn-based corrections: single-correction instances only
        rows = rows.filter(lambda r: r["update_kinds"].count("correction") == 1)
    prompt_format = PromptFormat.for_tokenizer(tokenizer, args.shots)
    if answers_by is not None:
        rows = cached_own_answers(args, rows, answers_by, tokenizer, prompt_format, cache_dir, split_seed)
    return rows.map(
        lambda r: tokenize_row(r, tokenizer, fmt, prompt_format, teacher=teacher),
        remove_columns=rows.column_names,
    )


def cached_own_answers(
    args: DuplexArguments,
    rows: datasets.Dataset,
    model: PreTrainedModel,
    tokenizer,
    prompt_format: PromptFormat,
    cache_dir: Path,
    seed: int,
) -> datasets.Dataset:
    """`own_answer_rows` of `rows`, written once per backbone, prompt format, instances and budget, and read back from
    `cache_dir` after (a resumed run, the other processes of a distributed one); an interrupted writing resumes after
    its last finished stage."""
    instances = rows.select_columns(["prompt", "update_word_indices", "update_texts", "update_shifts"]).to_dict()
    afresh = "first" if args.own_answer_afresh == "first" else "last"  # "never": the rows of "last" that go on
    key = [args.backbone, args.shots, hashlib.sha256(json.dumps(instances).encode()).hexdigest(), seed]
    key += [args.own_answer_tokens, args.own_answer_samples, afresh]
    if args.own_answer_channel:
        key.append(["channel", str(Path(args.own_answer_channel).resolve())])
    path = cache_dir / hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    journal = path.with_name(path.name + "-journal")  # the finished stages of an interrupted writing
    if not (path / "dataset_info.json").exists():
        logger.info("writing the backbone's own answers to %d rows into %s", len(rows), path)
        answered = own_answer_rows(
            rows,
            model.get_base_model(),  # the frozen backbone: what the fresh zero-gated model writes, minus its overhead
            tokenizer,
            prompt_format,
            max_new_tokens=args.own_answer_tokens,
            samples=args.own_answer_samples,
            seed=seed,
            afresh=afresh,
            channel=load_channel(args.own_answer_channel, args.backbone) if args.own_answer_channel else None,
            journal=journal,
        )
        answered.save_to_disk(str(path))
        shutil.rmtree(journal, ignore_errors=True)  # the rows are kept whole now
    answered = datasets.load_from_disk(str(path))
    if args.own_answer_afresh == "never":
        kept = answered.filter(lambda r: "afresh" not in r["followed"])
        logger.info("own answers that go on: %d of %d rows", len(kept), len(answered))
        return kept
    return answered


def load_channel(path: str, backbone: str) -> DuplexForCausalLM:
    """A trained Duplex checkpoint (an adapter-only one loads onto the local `backbone`), in eval mode."""
    return DuplexForCausalLM.from_pretrained(path, backbone_name_or_path=backbone).eval()


def gated_optimizer(
    model: torch.nn.Module, args: TrainingArguments, gate_lr: float, encoder_lr: float | None = None
) -> torch.optim.Optimizer:
    """AdamW with the adapters' gates in a group of their own: zero-initialised scalars that must open far and
    early, so they get a higher learning rate than the rest (as LLaMA-Adapter's gating does). `encoder_lr`: the update
    encoder's layers in a group of their own too (on a pretrained backbone a small one keeps them near the identity,
    where the backbone reads a correction as text), the decision head staying at the base rate."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def in_encoder(name: str) -> bool:
        return encoder_lr is not None and ".update_encoder.layers." in f".{name}"

    gates = [p for n, p in trainable if n.endswith(".gate")]
    encoder = [p for n, p in trainable if in_encoder(n)]
    rest = [p for n, p in trainable if not n.endswith(".gate") and not in_encoder(n)]
    groups = [{"params": rest}, {"params": gates, "lr": gate_lr, "weight_decay": 0.0}]
    if encoder:
        groups.append({"params": encoder, "lr": encoder_lr})
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


@dataclass
class Rollout:
    """One row's on-policy sample: the model's own continuation after its first update, with the two contexts it is
    scored in: the workspace (prompt + answer so far, the update in the workspace) and the in-band teacher (the same
    answer so far with the correction spliced in as text; a backchannel is left out)."""

    prompt: list[int]
    prefix: list[int]  # the oracle's answer tokens before the update (forced)
    update: list[int]  # what the update encoder reads: the correction as in-band text writes it
    teacher_context: list[int]  # the teacher rendering up to the same point
    oracle_rest: int  # the oracle's answer tokens after the update (EOS included)
    continuation: list[int] = field(default_factory=list)  # what the model writes after the update


def rollout_rows(inputs: dict, taught: dict) -> list[Rollout]:
    """The rows of a collated batch that have an update, read back from the tensors the collator built, ready to be
    rolled out (no continuation yet)."""
    rows = []
    positions = inputs.get("update_positions")
    if positions is None or not positions.numel():
        return rows
    for b in range(positions.shape[0]):
        if int(positions[b, 0]) == NO_UPDATE:
            continue
        response = (inputs["labels"][b] != IGNORE_INDEX).nonzero()[:, 0]  # the answer's token positions
        prompt_len = int(response[0])
        at = int(positions[b, 0]) - update_position(prompt_len, 0)  # `update_position` inverted
        ids = inputs["input_ids"][b].tolist()
        update = inputs["update_input_ids"][b, 0][inputs["update_attention_mask"][b, 0].bool()].tolist()
        teacher_response = (taught["teacher_labels"][b] != IGNORE_INDEX).nonzero()[:, 0]
        teacher_context = taught["teacher_input_ids"][b, : int(teacher_response[at])].tolist()
        rows.append(
            Rollout(ids[:prompt_len], ids[prompt_len : prompt_len + at], update, teacher_context, len(response) - at)
        )
    return rows


@torch.no_grad()
def roll_out(model: DuplexForCausalLM, inputs: dict, taught: dict, max_rows: int, pad_token_id: int) -> list[Rollout]:
    """Greedy continuations of the model itself after each row's first update (at most `max_rows` rows): the oracle's
    answer is forced up to the update, the update lands where the collator put it, then the model writes freely
    (as long as the oracle's rest, plus a few tokens of room to go wrong)."""
    rows = rollout_rows(inputs, taught)[:max_rows]
    if not rows:
        return []
    width = max(len(r.prompt) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
        attention_mask[i, width - len(r.prompt) :] = 1
    eos, room = model.config.text_config.eos_token_id, 4
    training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            updates=[[(len(r.prefix), r.update)] for r in rows],
            logits_processor=LogitsProcessorList([PrefixForcing([r.prefix for r in rows], width)]),
            max_new_tokens=max(len(r.prefix) + r.oracle_rest for r in rows) + room,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_token_id,
            eos_token_id=eos,
        )
    finally:
        model.train(training)
    for i, r in enumerate(rows):
        new = out[i, width + len(r.prefix) :].tolist()[: r.oracle_rest + room]
        r.continuation = new[: new.index(eos) + 1] if eos in new else new
    return rows


def onpolicy_batches(rollouts: list[Rollout], pad_token_id: int) -> tuple[dict, dict]:
    """The workspace batch (with its update) and the teacher batch of the rollouts, each labelling exactly the
    continuation's tokens, in the same order (what `distillation_loss` pairs up)."""
    collate = DuplexCollator(pad_token_id)
    student = [
        {
            "input_ids": r.prompt + r.prefix + r.continuation,
            "labels": [IGNORE_INDEX] * (len(r.prompt) + len(r.prefix)) + r.continuation,
        }
        for r in rollouts
    ]
    teacher = [
        {
            "input_ids": r.teacher_context + r.continuation,
            "labels": [IGNORE_INDEX] * len(r.teacher_context) + r.continuation,
        }
        for r in rollouts
    ]
    positions = [update_position(len(r.prompt), len(r.prefix)) for r in rollouts]
    student_batch = collate(student) | pack_updates(
        [[(position, r.update)] for position, r in zip(positions, rollouts, strict=True)], pad_token_id=pad_token_id
    )
    return student_batch, collate(teacher)


class DuplexTrainer(Trainer):
    """The Trainer, with `gated_optimizer` when `gate_lr` is given (the encoder's layers at `encoder_lr` if given),
    and context distillation from the in-band teacher when `distill_weight` > 0. The optimizer is built in
    `create_optimizer`, on the model the Trainer hands it, because FSDP refuses a ready-made one (it must see the
    wrapped parameters)."""

    def __init__(
        self,
        *args,
        gate_lr: float | None = None,
        encoder_lr: float | None = None,
        distill_weight: float = 0.0,
        onpolicy_weight: float = 0.0,
        onpolicy_rows: int = 8,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.gate_lr, self.encoder_lr = gate_lr, encoder_lr
        self.distill_weight = distill_weight
        self.onpolicy_weight, self.onpolicy_rows = onpolicy_weight, onpolicy_rows

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Cross-entropy on the oracle, plus `distill_weight` x KL to the teacher on the oracle's tokens (the same
        model without updates, exactly its frozen backbone, reading the teacher rendering), plus `onpolicy_weight` x
        KL to that teacher on the model's own continuations after its update (`roll_out`)."""
        taught = {key: inputs.pop(key) for key in list(inputs) if key.startswith("teacher_")}
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if taught and self.distill_weight:
            with torch.no_grad():
                teacher = model(input_ids=taught["teacher_input_ids"], attention_mask=taught["teacher_attention_mask"])
            kl = distillation_loss(outputs.logits, inputs["labels"], teacher.logits, taught["teacher_labels"])
            loss = loss + self.distill_weight * kl
        if taught and self.onpolicy_weight and model.training:
            loss = loss + self.onpolicy_weight * self.onpolicy_loss(model, inputs, taught)
        return (loss, outputs) if return_outputs else loss

    def onpolicy_loss(self, model, inputs: dict, taught: dict) -> torch.Tensor:
        """KL(in-band teacher || workspace model) on the tokens the model itself writes after its update."""
        pad = self.processing_class.pad_token_id
        rollouts = roll_out(self.accelerator.unwrap_model(model), inputs, taught, self.onpolicy_rows, pad)
        if not rollouts:
            return torch.zeros((), device=inputs["input_ids"].device)
        device = inputs["input_ids"].device
        student, teacher = ({k: v.to(device) for k, v in batch.items()} for batch in onpolicy_batches(rollouts, pad))
        labels = student.pop("labels")
        with torch.no_grad():
            teacher_logits = model(input_ids=teacher["input_ids"], attention_mask=teacher["attention_mask"]).logits
        student_logits = model(**student).logits
        return distillation_loss(student_logits, labels, teacher_logits, teacher["labels"])

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints decode as they are: saved with the KV cache on (training turns it off), beside the tokenizer
        (`processing_class`), so any `checkpoint-N` can be evaluated or served."""
        with cache_on(self.accelerator.unwrap_model(self.model)):
            super()._save(output_dir, state_dict)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.gate_lr is not None and self.optimizer is None:
            model = self.model if model is None else model
            self.optimizer = gated_optimizer(model, self.args, self.gate_lr, self.encoder_lr)
        return super().create_optimizer(model)


@contextmanager
def decodable(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """The model being trained, ready to decode held-out prompts: the KV cache on and, for a plain backbone (phase 0),
    fresh zero-gated duplex modules around it (exactly the backbone, for its in-band column), decoding without the
    trainer's autocast. Its trainable flags, cache setting, forward and training mode are restored afterwards."""
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        with cache_on(model), without_autocast_wrapper(model):
            yield model if isinstance(model, DuplexForCausalLM) else DuplexForCausalLM.from_backbone(model)
    finally:
        for param, flag in grad_flags:
            param.requires_grad_(flag)
        model.train(training)


@contextmanager
def without_autocast_wrapper(model: PreTrainedModel) -> Iterator[None]:
    """Decode in the weights' own precision: under mixed precision accelerate wraps `model.forward` in autocast (and
    keeps the plain one as `_original_forward`); greedy held-out scores under bf16 autocast are noise on a real
    backbone. The wrapper is put back afterwards."""
    wrapped = model.__dict__.get("forward")
    original = getattr(model, "_original_forward", None)
    if wrapped is None or original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


CURVE_METRICS = ("retention", "revision_accuracy", "two_update_accuracy", "distractor_stability")


class HeldOutCurves(TrainerCallback):
    """Greedy held-out accuracy per family every `every` steps, appended to `curves.jsonl` and drawn in `curves.png`
    beside loss.png: the loss does not say which family a model can write. Each record carries the training wall
    time so far (evaluation excluded, carried over a resume), for accuracy against steps and against time.

    `modes` are scored at every point, `once_modes` (what does not change as training goes, e.g. the frozen
    backbone's in-band column) only at the first."""

    def __init__(
        self,
        tokenizer,
        out_dir: Path,
        every: int,
        n_per_family: int,
        modes: Sequence[str],
        kinds: Sequence[str],
        splits: Sequence[str] = ("test",),
        once_modes: Sequence[str] = (),
        families: Sequence[str] | None = None,
        shots: int = 0,
        max_new_tokens: int | None = None,
    ):
        self.tokenizer, self.every, self.n_per_family = tokenizer, every, n_per_family
        self.max_new_tokens = max_new_tokens  # None: as long as the oracles' answers, plus room
        self.modes, self.once_modes, self.kinds, self.splits = list(modes), list(once_modes), list(kinds), list(splits)
        self.families, self.shots = families, shots
        self.path = Path(out_dir) / "curves.jsonl"
        self.train_seconds, self._tick = 0.0, 0.0  # set when training begins (carried over a resume)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        records = read_curves(self.path)
        self.train_seconds = records[-1]["train_seconds"] if records else 0.0
        self._tick = time.perf_counter()
        if state.is_world_process_zero and not any(r["step"] == state.global_step for r in records):
            self._record(model, state.global_step, [*self.modes, *self.once_modes])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.is_world_process_zero:
            self._record(model, state.global_step, self.modes)

    def _record(self, model, step: int, modes: Sequence[str]) -> None:
        import eval_duplex

        now = time.perf_counter()
        self.train_seconds += now - self._tick
        record = {"step": step, "train_seconds": round(self.train_seconds, 1), "splits": {}}
        with torch.random.fork_rng(), decodable(model) as duplex:  # training draws the same random numbers
            for split in self.splits:
                results = eval_duplex.evaluate(
                    duplex,
                    self.tokenizer,
                    n_per_family=self.n_per_family,
                    modes=modes,
                    kinds=self.kinds,
                    split=split,
                    sweep_per_family=0,
                    progress=False,
                    families=self.families,
                    shots=self.shots,
                    max_new_tokens=self.max_new_tokens,
                )
                record["splits"][split] = curve_point(results)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        plot_curves(read_curves(self.path), self.path.with_suffix(".png"))
        overall = {
            f"{split}/{column}/{metric}": round(100 * v["overall"], 1)
            for split, columns in record["splits"].items()
            for column, metrics in columns.items()
            for metric, v in metrics.items()
        }
        logger.info("held-out at step %d: %s", step, overall)
        self._tick = time.perf_counter()


def curve_point(results: dict) -> dict[str, dict[str, dict]]:
    """column -> metric -> {"overall": rate, "per_family": {family: rate}} of `evaluate` results, where measured
    (retention only for the backbone column: every mode writes the same without updates)."""
    point: dict[str, dict[str, dict]] = {}
    for column, metrics in results["metrics"].items():
        for metric in CURVE_METRICS:
            stat = metrics[metric]
            if stat["overall"]["n"] and (metric == "retention") == (column == "backbone"):
                point.setdefault(column, {})[metric] = {
                    "overall": stat["overall"]["rate"],
                    "per_family": {f: v["rate"] for f, v in stat["per_family"].items() if v["n"]},
                }
    return point


def read_curves(path: Path) -> list[dict]:
    """The records a HeldOutCurves callback wrote (none yet: an empty list)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plot_curves(records: list[dict], path: Path) -> None:
    """One panel per split, column and metric: held-out accuracy per family (thin) and overall (thick) against
    steps, and a last panel with every overall curve against training wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str, str], list[tuple[int, float, dict]]] = {}
    for r in records:
        for split, columns in r["splits"].items():
            for column, metrics in columns.items():
                for metric, v in metrics.items():
                    series.setdefault((split, column, metric), []).append((r["step"], r["train_seconds"], v))
    if not series:
        return
    cols = 3
    rows = -(-(len(series) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, ((split, column, metric), points) in zip(axes, sorted(series.items()), strict=False):
        families = sorted({f for _, _, v in points for f in v["per_family"]})
        for family in families:
            pts = [(s, 100 * v["per_family"][family]) for s, _, v in points if family in v["per_family"]]
            ax.plot(*zip(*pts, strict=True), marker=".", linewidth=1, label=family)
        ax.plot(
            [s for s, _, _ in points], [100 * v["overall"] for _, _, v in points], "k-o", linewidth=2.5, label="overall"
        )
        ax.set(title=f"{split}: {column} {metric.replace('_', ' ')}", xlabel="step", ylabel="%", ylim=(-3, 103))
    axes[0].legend(fontsize=7, ncol=2)
    wall = axes[len(series)]
    for (split, column, metric), points in sorted(series.items()):
        if len(points) > 1:
            wall.plot(
                [t / 60 for _, t, _ in points],
                [100 * v["overall"] for _, _, v in points],
                marker=".",
                label=f"{split} {column} {metric.replace('_', ' ')}",
            )
    wall.set(title="overall vs training time", xlabel="minutes of training", ylabel="%", ylim=(-3, 103))
    if wall.lines:
        wall.legend(fontsize=6)
    for ax in axes[len(series) + 1 :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_phase(
    model,
    dataset,
    training_args: TrainingArguments,
    name: str,
    steps: int,
    collator,
    tokenizer=None,
    trainer_options: dict | None = None,
    callbacks: list[TrainerCallback] | None = None,
    **overrides,
):
    """One Trainer run in `output_dir/name`; resumes from that phase's last checkpoint when asked.
    `trainer_options`: DuplexTrainer's own (gate_lr and the loss terms); `overrides`: TrainingArguments fields."""
    out = Path(training_args.output_dir) / name
    # push_to_hub: the final model goes to one repo at the end (`publish`), not each phase's checkpoints to its own
    args = dataclasses.replace(training_args, output_dir=str(out), max_steps=steps, push_to_hub=False, **overrides)
    trainer = DuplexTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        **(trainer_options or {}),
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


@contextmanager
def cache_on(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """`ready_for_generation` for the duration only: a model in training decodes (or is saved) with its KV cache on,
    then trains on as it was set."""
    configs = {id(c): c for c in (model.config, model.config.get_text_config(), model.generation_config)}.values()
    flags = [(config, getattr(config, "use_cache", True)) for config in configs]  # unset: on
    try:
        yield ready_for_generation(model)
    finally:
        for config, flag in flags:
            config.use_cache = flag


def parse_weights(text: str | None, known: Sequence[str], flag: str) -> dict[str, float] | None:
    """'add=4,case=2' -> {"add": 4.0, "case": 2.0} over the `known` names; None stays None (all weigh the same)."""
    if not text:
        return None
    weights = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in known:
            raise ValueError(f"{flag}: expected name=weight with a name of {list(known)}, got {item!r}")
        weights[name.strip()] = float(value)
    return weights


def native_bf16(use_cpu: bool = False) -> bool:
    """Whether the training device computes bf16 natively: a GPU that supports it, or a CPU with AVX-512 BF16 or AMX
    (oneDNN's check). Elsewhere bf16 autocast is emulated and far slower than fp32 (25x on an AVX2-only CPU)."""
    if torch.cuda.is_available() and not use_cpu:
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pretrain_tiny_backbone(args: DuplexArguments, training_args: TrainingArguments, tokenizer) -> Path:
    """Phase 0: a tiny Qwen3 learns the tasks from plain answers, turn-based corrections (restart format) and
    corrections given in-band mid-answer, so that, like a real pretrained LM, it has seen text change course."""
    out = Path(training_args.output_dir) / "backbone"
    if (out / "config.json").exists():
        logger.info("phase 0: reusing the pretrained backbone in %s", out)
        return out
    set_seed(training_args.seed)
    if args.phase0_init:  # a long run built in pieces: go on from a pretrained backbone's weights
        backbone = Qwen3ForCausalLM.from_pretrained(args.phase0_init)
    else:
        config = backbone_config(
            "tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        backbone = Qwen3ForCausalLM(config)
    weights = parse_weights(args.phase0_family_weights, list(FAMILIES), "--phase0_family_weights")
    landing = parse_weights(args.phase0_landing_weights, LANDINGS, "--phase0_landing_weights") or "any"
    plain = tokenized(args, training_args.seed + 100, args.train_size, tokenizer, "plain", family_weights=weights)
    restart = tokenized(
        args, training_args.seed + 101, args.train_size // 2, tokenizer, "restart", family_weights=weights
    )
    inband = tokenized(  # corrections spliced in wherever they land: before the space, after it, inside a word
        args, training_args.seed + 102, args.train_size, tokenizer, "inband", family_weights=weights, landing=landing
    )
    corpus = datasets.concatenate_datasets([plain, restart, inband]).shuffle(seed=training_args.seed)
    bf16 = native_bf16(training_args.use_cpu) if args.phase0_bf16 is None else args.phase0_bf16
    logger.info("phase 0 in %s", "bf16 autocast" if bf16 else "fp32")
    curves = HeldOutCurves(
        tokenizer,
        Path(training_args.output_dir) / "phase0",
        args.phase0_eval_steps,
        args.phase0_eval_per_family,
        modes=["inband", "restart"],
        kinds=["none", "one", "one_in_word"],
        splits=["test", "outside"],
        families=args.family_names,
    )
    run_phase(
        backbone,
        corpus,
        training_args,
        "phase0",
        args.phase0_steps,
        DuplexCollator(tokenizer.pad_token_id),
        tokenizer,
        callbacks=[curves] if args.phase0_eval_steps else None,
        learning_rate=args.phase0_lr,
        per_device_train_batch_size=args.phase0_batch_size,
        warmup_steps=100,
        bf16=bf16,
        use_cpu=training_args.use_cpu or (bf16 and not torch.cuda.is_available()),  # CPU autocast
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


def record_training(final: Path, args: DuplexArguments, argv: list[str] | None) -> None:
    """`eval/train_args.json` beside the checkpoint: the arguments and the command line (the model card shows it)."""
    command = shlex.join(["python", "train_duplex.py", *(sys.argv[1:] if argv is None else argv)])
    (final / "eval").mkdir(parents=True, exist_ok=True)
    (final / "eval" / "train_args.json").write_text(
        json.dumps({**dataclasses.asdict(args), "command": command}, indent=2)
    )


def publish(model: DuplexForCausalLM, final: Path, training_args: TrainingArguments) -> None:
    """Rewrite the final checkpoint's card (now with its evaluation, if it ran); with `--push_to_hub`, upload the
    folder (model, tokenizer, card, evaluation report) as one commit to `--hub_model_id`, or to a repo named after
    `--output_dir`."""
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).resolve().name
    duplex_params = sum(t.numel() for t in model.duplex_state_dict().values())
    card = build_model_card(model.config, final, duplex_params, repo_id if training_args.push_to_hub else None)
    card.save(final / "README.md")
    if not training_args.push_to_hub:
        return
    logger.info("pushing %s to the Hub repo %s", final, repo_id)
    commit = push_folder(
        final,
        repo_id,
        commit_message=f"Upload {final.name} of train_duplex.py",
        private=training_args.hub_private_repo,
        token=training_args.hub_token,
        revision=training_args.hub_revision,
    )
    logger.info("pushed: %s", getattr(commit, "commit_url", commit))


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
        tokenizer = AutoTokenizer.from_pretrained(SHIPPED_BACKBONE, padding_side="left")  # as generate needs
        backbone_path = SHIPPED_BACKBONE
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.backbone, padding_side="left")
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
        teacher = args.distill_weight > 0 or args.onpolicy_weight > 0
        with training_args.main_process_first(desc="training rows"):  # own answers: written once, read by the rest
            data = tokenized(
                args,
                training_args.seed + 2,
                args.train_size,
                tokenizer,
                "duplex",
                mix=args.duplex_mix_weights,
                teacher=teacher,
                landing="any",  # before the space, after it and inside a word: wherever a user's correction arrives
                answers_by=model if args.own_answers else None,
                cache_dir=out / "own_answers",
            )
        curves = HeldOutCurves(
            tokenizer,
            out / "duplex",
            args.curve_steps,
            args.curve_per_family,
            modes=["workspace"],
            once_modes=["inband", "ignore"],  # the frozen backbone's own columns do not move as the channel trains
            kinds=["one", "two", "distractor"],
            families=args.family_names,
            shots=args.shots,
            max_new_tokens=args.own_answer_tokens if args.own_answers else None,  # the budget the answers were cut to
        )
        trainer = run_phase(
            model,
            data,
            training_args,
            "duplex",
            args.duplex_steps,
            collator,
            tokenizer,
            trainer_options={
                "gate_lr": args.gate_lr,
                "encoder_lr": args.encoder_lr,
                "distill_weight": args.distill_weight,
                "onpolicy_weight": args.onpolicy_weight,
                "onpolicy_rows": args.onpolicy_rows,
            },
            callbacks=[curves] if args.curve_steps else None,
        )
        model = gathered_model(trainer, model)
        if not training_args.should_save:  # multi-process runs: the main process saves (and evaluates), the rest end
            return None

    final = out / ("final" if args.method == "duplex" else "tdm-final")  # tdm may share the output dir
    model.config.backbone_name_or_path = str(backbone_path)
    record_training(final, args, argv)
    ready_for_generation(model).save_pretrained(final)
    tokenizer.save_pretrained(final)
    logger.info("saved %s", final)
    if args.method == "tdm":
        publish(model, final, training_args)
        logger.info("compare: python eval_duplex.py --checkpoint %s --tdm-checkpoint %s", out / "final", final)
        return None
    if args.skip_eval:
        publish(model, final, training_args)
        return None
    import eval_duplex

    model.eval()
    results = eval_duplex.evaluate(
        model,
        tokenizer,
        n_per_family=args.eval_per_family,
        sweep_per_family=args.eval_sweep_per_family,
        families=args.family_names,
        shots=args.shots,
        max_new_tokens=args.own_answer_tokens if args.own_answers else None,
    )
    eval_duplex.write_report(results, final / "eval")
    print(eval_duplex.render_markdown(results))
    publish(model, final, training_args)
    return results


if __name__ == "__main__":
    main()
