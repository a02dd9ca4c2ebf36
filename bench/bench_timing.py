"""How fast: decode speed, paired single-token steps, correction latency and adapter placement, each variant
interleaved with the others so that the noise of a shared machine hits them alike.

Clocks: a generation step is stamped by a logits processor (wall time, and this process's CPU time, which other
processes do not inflate); on CUDA every stamp synchronises first, so it means that the step's kernels finished.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_models import build_duplex, random_ids
from bench_report import log, ratio
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from generation_duplex import pack_updates
from modeling_duplex import DuplexForCausalLM

MODES = ("workspace", "inband", "restart")  # how a correction reaches the model, in the latency comparison


# ----------------------------------------------------------------------------------------------------------------------
# Clocks
# ----------------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA); nothing on CPU."""
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


@dataclass
class TimedGeneration:
    """One timed `generate`: its output, the per-step clock and the wall seconds of the whole call."""

    output: object
    clock: StepClock
    seconds: float


DecodeRunner = Callable[[int], TimedGeneration]  # new tokens -> one timed generate of exactly that many


def generate_timed(
    model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int, special: dict, **kwargs
) -> TimedGeneration:
    """Greedy generate of exactly `new_tokens` tokens after `prompt`; `special` holds the eos and pad token ids,
    `kwargs` go to generate (updates, update_mode)."""
    clock = StepClock(prompt.device)
    synchronize(prompt.device)
    start = time.perf_counter()
    output = model.generate(
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
    return TimedGeneration(output, clock, time.perf_counter() - start)


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


def median(values: list[float]) -> float:
    """The median; NaN for no values."""
    return statistics.median(values) if values else float("nan")


def rotated(items: list, shift: int) -> list:
    """The same items in another order each repeat, so no variant always runs first (or right after another)."""
    shift %= len(items)
    return items[shift:] + items[:shift]


# ----------------------------------------------------------------------------------------------------------------------
# CPU threads
# ----------------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------------
# Decode speed
# ----------------------------------------------------------------------------------------------------------------------


def bench_decode(
    runners: dict[str, DecodeRunner], new_tokens: int, repeats: int, tag: str, device: torch.device
) -> dict[str, dict]:
    """Interleaved decode timing of each runner (a warm-up run each first) -> per runner: median decode tok/s (wall
    and, on CPU, CPU time), median step ms, median end-to-end tok/s (prefill included) and every run's tok/s.
    `tag` prefixes the progress lines."""
    names = list(runners)
    on_cpu = device.type == "cpu"
    rates: dict[str, list[float]] = {n: [] for n in names}
    cpu_rates: dict[str, list[float]] = {n: [] for n in names}
    end_to_end: dict[str, list[float]] = {n: [] for n in names}
    steps: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for name in names:  # warm-up: the same work as a measured run (updates included)
            runners[name](new_tokens)
        for r in range(repeats):
            for name in rotated(names, r):
                run = runners[name](new_tokens)
                rates[name].append(decode_rate(run.clock))
                cpu_rates[name].append(decode_rate(run.clock, cpu=True))
                end_to_end[name].append(new_tokens / run.seconds)
                steps[name] += step_seconds(run.clock)
            log(f"[{tag}] repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in names) + " tok/s")
    return {
        n: {
            "decode_tok_s": median(rates[n]),
            "cpu_time_tok_s": median(cpu_rates[n]) if on_cpu else None,
            "median_step_ms": 1000 * median(steps[n]),
            "end_to_end_tok_s": median(end_to_end[n]),
            "runs_tok_s": rates[n],
        }
        for n in names
    }


def make_stepper(model: PreTrainedModel, prompt: torch.Tensor) -> Callable[[], float]:
    """A single-token decode forward after `prompt` (cache cropped back after each call, so every call sees the
    same context) -> its wall seconds. A DuplexForCausalLM reads its workspace K/V, computed once, as in generate."""
    device = prompt.device
    workspace: dict = {}
    if isinstance(model, DuplexForCausalLM):
        correction = prompt[0, :16].tolist()  # a workspace holding one correction-sized update
        packed = pack_updates([[(prompt.shape[1] - 1, correction)]])  # placed after the prompt, as generate does
        versions, _ = model.workspace_versions(1, **{k: v.to(device) for k, v in packed.items()})
        context = versions.placed_in_context()
        context.keep = True
        workspace = {"context_workspace": context}
    config = model.config.text_config if isinstance(model, DuplexForCausalLM) else model.config
    cache = DynamicCache(config=config)
    model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1, **workspace)
    token = prompt[:, -1:]

    def step() -> float:
        synchronize(device)
        start = time.perf_counter()
        logits = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1, **workspace).logits
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


# ----------------------------------------------------------------------------------------------------------------------
# Correction latency
# ----------------------------------------------------------------------------------------------------------------------


def landing_latency(run: TimedGeneration, at: int, device: torch.device) -> tuple[float, float]:
    """(seconds from the update's arrival to its landing, median seconds of the run's decode steps after it), for a
    run with one update at new token `at`. On CUDA the landing record is stamped before the kernels finish, so the
    synchronised step clock gives the landing time instead."""
    row_landings = run.output.update_landings[0]  # the batch's only row
    landing = row_landings[0]  # its only update
    if landing.at != at or landing.landed_time is None or landing.arrived_time is None:
        raise RuntimeError(f"the update did not land at {at}: {landing}")
    landed = run.clock.times[at] if device.type == "cuda" else landing.landed_time
    after = [step for i, step in enumerate(step_seconds(run.clock), start=1) if i > at]
    return landed - landing.arrived_time, median(after)


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


LatencyRun = Callable[[], tuple[float, float | None]]  # -> (latency s, median plain decode step s or None)


@dataclass
class CorrectionLatency:
    """How long one correction takes to reach the model after a context of a given length, in each of MODES:
    workspace and inband through generate's landing timestamps (the update arrives after `update_at` new tokens,
    at most half the context), restart as one forward of the bare backbone over context + correction."""

    model: DuplexForCausalLM
    base: PreTrainedModel
    correction: list[int]
    update_at: int
    special: dict
    steps_after: int = 8  # decoding steps timed after the correction (reading it, or the text spliced in)

    @classmethod
    def with_random_correction(
        cls, model: DuplexForCausalLM, base: PreTrainedModel, correction_len: int, update_at: int, special: dict
    ) -> CorrectionLatency:
        """The benchmark's setup: a seeded random correction of `correction_len` tokens."""
        vocab = model.config.text_config.vocab_size
        correction = random_ids(correction_len, vocab, 7, torch.device("cpu"))[0].tolist()
        return cls(model, base, correction, update_at, special)

    def runner(self, length: int, mode: str) -> LatencyRun:
        """One timed correction after a `length`-token context (the same seeded context on every call) -> (latency
        in s, median decode step in s after the correction in the same generate, None for restart)."""
        device = self.model.device
        vocab = self.model.config.text_config.vocab_size
        at = min(self.update_at, length // 2)
        prompt = random_ids(length - at, vocab, length, device)
        if mode == "restart":
            so_far = random_ids(at, vocab, length + 1, device)
            context = torch.cat([prompt, so_far, torch.tensor([self.correction], device=device)], dim=1)
            return lambda: (restart_once(self.base, context), None)

        def run() -> tuple[float, float]:
            new_tokens = at + 1 + self.steps_after
            timed = generate_timed(
                self.model, prompt, new_tokens, self.special, updates=[(at, self.correction)], update_mode=mode
            )
            return landing_latency(timed, at, device)

        return run


def bench_latency(latency: CorrectionLatency, contexts: list[int], repeats: int) -> dict[int, dict]:
    """Correction latency per context length and mode (medians over `repeats`, modes interleaved), with the plain
    decode step of the workspace runs and the ratios restart / workspace and workspace / inband."""
    results: dict[int, dict] = {}
    with torch.inference_mode():
        for mode in MODES:  # warm-up
            latency.runner(min(contexts), mode)()
        for length in contexts:
            runs: dict[str, list[float]] = {m: [] for m in MODES}
            steps: dict[str, list[float]] = {"workspace": [], "inband": []}
            runners = {m: latency.runner(length, m) for m in MODES}
            for r in range(repeats):
                for mode in rotated(list(MODES), r):
                    seconds, step = runners[mode]()
                    runs[mode].append(seconds)
                    if step is not None:
                        steps[mode].append(step)
            row = {f"{m}_ms": 1000 * median(runs[m]) for m in MODES}
            row["decode_step_ms"] = 1000 * median(steps["workspace"])  # the steps after the correction landed
            row["inband_decode_step_ms"] = 1000 * median(steps["inband"])  # the backbone alone, same context
            row["decode_speed_after_correction"] = row["inband_decode_step_ms"] / row["decode_step_ms"]
            row["restart_over_workspace"] = row["restart_ms"] / row["workspace_ms"]
            row["workspace_over_inband"] = row["workspace_ms"] / row["inband_ms"]
            row["runs_ms"] = {m: [1000 * v for v in runs[m]] for m in MODES}
            results[length] = row
            log(
                f"[latency] context {length}: "
                + ", ".join(f"{m} {row[f'{m}_ms']:.1f} ms" for m in MODES)
                + f" (decode step after it: workspace {row['decode_step_ms']:.1f} ms, "
                f"inband {row['inband_decode_step_ms']:.1f} ms)"
            )
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Adapter placement
# ----------------------------------------------------------------------------------------------------------------------


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
    """Decode ratio vs the bare backbone for each adapter placement (duplex modules built over `backbone` with
    `duplex_kwargs`), all interleaved in one loop; a row per placement, the bare backbone first."""
    configs = placement_configs(backbone.config.num_hidden_layers)
    runners: dict[str, DecodeRunner] = {"bare": lambda n: generate_timed(base, prompt, n, special)}
    models = {}
    for cfg in configs:
        model = build_duplex(backbone, **{**duplex_kwargs, "adapter_layers": cfg["adapter_layers"]})
        models[cfg["name"]] = model
        runners[cfg["name"]] = lambda n, m=model: generate_timed(m, prompt, n, special)
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
        timing = timings[cfg["name"]]
        trainable, _ = models[cfg["name"]].get_nb_trainable_parameters()
        rows.append(
            {
                **cfg,
                "num_adapters": len(cfg["adapter_layers"]),
                "trainable_params": trainable,
                **timing,
                "ratio_vs_bare": ratio(timing, bare, "decode_tok_s"),
                "cpu_time_ratio_vs_bare": ratio(timing, bare, "cpu_time_tok_s"),
                "paired_step_ratio": paired[cfg["name"]]["paired_ratio"],
                "paired_step_ms": paired[cfg["name"]]["step_ms"],
            }
        )
    return rows
