"""Saving, carding and pushing Duplex checkpoints the way the Hugging Face Hub expects.

Remote code beside `modeling_duplex.py` (it is shipped with every checkpoint), so a model loaded from the Hub with
`trust_remote_code=True` saves and pushes the same way as one built from a checkout:

- `save_duplex`: a full or adapter-only checkpoint, always with a model card; `push_to_hub=True` uploads the whole
  folder, weights included, in one commit (transformers' own push would run before an adapter file is written).
- `build_model_card`: a `huggingface_hub.ModelCard` with the base model, tags, how to pass updates, the training
  command and, when the folder has `eval/results.json`, the evaluation as `model-index` results.
- `load_backbone`: the backbone an adapter-only checkpoint names, with an error that says how to use a local copy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
CARD_TAGS = ["duplex", "custom_code", "text-generation"]
HUB_KWARGS = ("repo_id", "commit_message", "commit_description", "private", "token", "revision", "create_pr")
RESULTS_FILE = Path("eval") / "results.json"
TRAIN_ARGS_FILE = Path("eval") / "train_args.json"
CARD_METRICS = (  # eval_duplex metrics put into `model-index`, for the workspace mode
    "revision_accuracy",
    "contradiction_rate",
    "distractor_stability",
    "retention",
    "two_update_accuracy",
    "three_update_accuracy",
)


# ----------------------------------------------------------------------------------------------------------------------
# Saving and pushing
# ----------------------------------------------------------------------------------------------------------------------


def save_duplex(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    save_with_transformers: Callable[..., Any],
    *,
    adapter_only: bool = False,
    push_to_hub: bool = False,
    training_command: str | None = None,
    tags: list[str] | None = None,
    **kwargs,
):
    """Write a full checkpoint (`save_with_transformers`, transformers' own `save_pretrained`) or an adapter-only one,
    then its model card; with `push_to_hub=True` upload the folder in one commit and return the commit info."""
    hub_kwargs = {name: kwargs.pop(name) for name in HUB_KWARGS if name in kwargs}
    hub_kwargs.setdefault("repo_id", Path(save_directory).name)
    add_auto_model(model)
    if adapter_only:
        save_adapter(model, save_directory, save_with_transformers, **kwargs)
    else:
        save_with_transformers(save_directory, **kwargs)
    repo_id = hub_kwargs["repo_id"] if push_to_hub else None
    duplex_params = sum(t.numel() for t in model.duplex_state_dict().values())
    card = build_model_card(model.config, save_directory, duplex_params, repo_id, training_command, tags)
    card.save(Path(save_directory) / "README.md")
    if push_to_hub:
        return push_folder(save_directory, **hub_kwargs)
    return None


def add_auto_model(model: PreTrainedModel) -> None:
    """Let `AutoModel` load the checkpoint too (transformers writes only the auto class the model registered for)."""
    reference = f"{type(model).__module__.split('.')[-1]}.{type(model).__name__}"
    model.config.auto_map = {**(getattr(model.config, "auto_map", None) or {}), "AutoModel": reference}


def save_adapter(
    model: PreTrainedModel, save_directory: str | os.PathLike, save_with_transformers: Callable[..., Any], **kwargs
) -> None:
    """config.json, code and generation config, plus the duplex weights alone in `adapter_model.safetensors`
    (PEFT-style); `from_pretrained` loads the backbone that `config.backbone_name_or_path` names under them."""
    if not model.config.backbone_name_or_path:
        raise ValueError("save_pretrained(adapter_only=True) needs `config.backbone_name_or_path` to be set")
    Path(save_directory).mkdir(parents=True, exist_ok=True)
    save_with_transformers(save_directory, state_dict={}, **kwargs)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.duplex_state_dict().items()}
    save_file(weights, str(Path(save_directory) / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    for stale in Path(save_directory).glob("model*.safetensors*"):
        stale.unlink()


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Create `repo_id` if needed and upload everything in `folder` to it as one commit."""
    api = HfApi(token=token, library_name="transformers")
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message or "Upload Duplex model",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Loading the backbone of an adapter-only checkpoint
# ----------------------------------------------------------------------------------------------------------------------


def load_backbone(name: str, **kwargs) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(name)`, with an error that names the backbone and how to point at a
    local copy when it cannot be found."""
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as error:
        raise OSError(
            f"Duplex could not load its backbone {name!r} (named by `backbone_name_or_path` in the checkpoint's "
            f"config.json): {error}\nIf you have a copy of it, pass its folder: "
            f"`from_pretrained(checkpoint, trust_remote_code=True, backbone_name_or_path='/path/to/{Path(name).name}')`"
            f"; to fetch it: `hf download {name} --local-dir /path/to/{Path(name).name}`."
        ) from error


# ----------------------------------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------------------------------

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A Duplex model: the causal LM `{{ backbone }}`, kept frozen, plus a zero-gated
workspace ({{ workspace_update }} update, {{ num_slots }} slots, read by {{ num_adapters }} of its layers) that takes
corrections while the model is generating. Without updates it writes exactly what its backbone writes.
{% if adapter_only %}
This repository holds only the duplex weights (`adapter_model.safetensors`, {{ duplex_params }} parameters); loading
it also loads the backbone `{{ backbone }}`. To use a local copy of the backbone, pass
`backbone_name_or_path="/path/to/{{ backbone_leaf }}"` to `from_pretrained`.
{% endif %}
## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

repo = "{{ repo_id }}"
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(repo)
inputs = tokenizer({{ prompt }}, return_tensors="pt")
out = model.generate(
    **inputs, updates=[({{ at }}, {{ update }})], tokenizer=tokenizer, max_new_tokens=48, do_sample=False
)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

`updates` is a list of `(at, text)` or `(at, token_ids)` pairs (or `DuplexUpdate`s): the update lands after `at` new
tokens. A batch takes one such list per row (tokenizers pad on the left). Live corrections from another thread go
through an `UpdateStream` (`updates=stream`, then `stream.put("...")` while `generate` runs); a Hub model's class is
at `transformers.dynamic_module_utils.get_class_from_dynamic_module("generation_duplex.UpdateStream", repo)`.
`update_mode="inband"` splices the correction into the context instead, `"ignore"` drops it (the ablation).
Beam search, assisted decoding and prompt lookup work without updates and are refused with them.

## Training

```bash
{{ training_command }}
```
{% if evaluation %}
## Evaluation

{{ evaluation }}
{% endif %}"""


def build_model_card(
    config: PretrainedConfig,
    folder: str | os.PathLike,
    duplex_params: int,
    repo_id: str | None = None,
    training_command: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """The card of the Duplex checkpoint in `folder` (its `eval/` report, when there is one, becomes `model-index`);
    `duplex_params`: how many parameters the duplex modules have; `tags`: more tags beside Duplex's own."""
    folder = Path(folder)
    adapter_only = (folder / ADAPTER_WEIGHTS_NAME).exists()
    backbone = config.backbone_name_or_path or config.text_config.name_or_path or config.text_config.model_type
    results = read_json(folder / RESULTS_FILE)
    model_name = repo_id.split("/")[-1] if repo_id else folder.name
    card_data = ModelCardData(
        base_model=hub_id(backbone),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=CARD_TAGS + (["adapter"] if adapter_only else []) + list(tags or []),
        model_name=model_name,
        eval_results=eval_results(results) or None,
    )
    prompt, at, update = usage_example(results)
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=model_name,
        repo_id=repo_id or str(folder),
        backbone=backbone,
        backbone_leaf=Path(str(backbone)).name,
        adapter_only=adapter_only,
        duplex_params=f"{duplex_params:,}",
        workspace_update=config.workspace_update,
        num_slots=config.num_slots,
        num_adapters=len(config.adapter_layers),
        prompt=json.dumps(prompt),
        at=at,
        update=json.dumps(update),
        training_command=training_command or recorded_command(folder) or default_command(backbone),
        evaluation=evaluation_text(folder),
    )


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None where there is none."""
    return json.loads(path.read_text()) if path.is_file() else None


def hub_id(name: str | None) -> str | None:
    """`name` if it can only be a Hub model id (not a folder that exists here), else None."""
    if not name or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name if "/" in name else None


def eval_results(results: dict | None) -> list[EvalResult]:
    """The workspace mode's overall rates from an eval_duplex report, as `model-index` entries."""
    if not results or "workspace" not in results.get("metrics", {}):
        return []
    config = results["config"]
    dataset = f"Duplex held-out corrections ({', '.join(config['families'])})"
    entries = []
    for metric in CARD_METRICS:
        overall = results["metrics"]["workspace"].get(metric, {}).get("overall", {})
        if overall.get("rate") is None:
            continue
        entries.append(
            EvalResult(
                task_type="text-generation",
                dataset_type="duplex-corrections",
                dataset_name=dataset,
                dataset_split=config.get("split"),
                metric_type=metric,
                metric_name=f"{metric.replace('_', ' ')} (n={overall['n']})",
                metric_value=round(overall["rate"], 4),
            )
        )
    return entries


def usage_example(results: dict | None) -> tuple[str, int, str]:
    """(prompt, at, correction) for the card's snippet: the evaluation's first workspace example, when there is one."""
    for example in (results or {}).get("examples", {}).get("workspace", []):
        if len(example["updates"]) == 1:
            (at, text), prompt = example["updates"][0], example["prompt"]
            return prompt, at, text
    return "Count from 3 to 9.\n", 2, "Stop at 5."


def recorded_command(folder: Path) -> str | None:
    """The command line train_duplex.py recorded beside its evaluation report."""
    return (read_json(folder / TRAIN_ARGS_FILE) or {}).get("command")


def default_command(backbone: str) -> str:
    """How a checkpoint over `backbone` is trained, where the folder does not say."""
    return f"python train_duplex.py --backbone {backbone} --output_dir runs/duplex"


def evaluation_text(folder: Path) -> str | None:
    """The evaluation report eval_duplex.py wrote into `folder/eval`, as Markdown."""
    report = folder / "eval" / "results.md"
    return report.read_text().strip().replace("## Duplex evaluation\n\n", "", 1) if report.is_file() else None


__all__ = [
    "ADAPTER_WEIGHTS_NAME",
    "build_model_card",
    "load_backbone",
    "push_folder",
    "save_adapter",
    "save_duplex",
]
