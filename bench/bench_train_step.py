"""A duplex training step on CPU, timed for this checkout and, side by side, for another one (before and after).

The step: forward + backward + AdamW step, fp32, on a teacher-forced batch (`--batch` rows of `--seq-len` random
tokens, one known correction of `--correction-len` tokens per row, at a different spot in each row), the backbone
frozen and the duplex modules trainable, as after training (the zero-initialised output projections given small
random weights, every gate open). The backbone is a shape of `backbone_shapes.py` with random weights (seed 0).
For reference, the same batch on the bare backbone: a plain causal-LM step with every weight trained (AdamW; the
`tdm` baseline of train_duplex.py) and the plain causal-LM loss alone (forward only, no gradient).

Each variant lives in a worker process of its own (`--worker`: this same file, with the checkout it times first on
sys.path), built once; the driver then asks the workers for one step each in turn, round after round, in a rotating
order, so that the noise of a shared machine hits every variant alike. Only one worker computes at a time.

Before / after the redesign (commit 8851304, the last before the duplex read moved into the backbone's attention):

    git worktree add /tmp/old 8851304
    python bench/bench_train_step.py --compare /tmp/old --shape smollm2-135m --threads 2 --out runs/train_step.json
    git worktree remove /tmp/old

`--repo PATH` times another checkout in place of this one. Small and quick (what tests/test_bench.py runs):

    python bench/bench_train_step.py --shape micro --seq-len 32 --batch 2 --rounds 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
KINDS = ("duplex", "bare-finetune", "bare-forward")
PREFIX = "@@"  # the workers' protocol lines on stdout; anything else there is passed on to stderr


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", help="a shape of backbone_shapes.py")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--correction-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per variant (after 1 warm-up step each)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads in each worker")
    parser.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose duplex step is timed")
    parser.add_argument("--compare", type=Path, default=None, help="another checkout, timed side by side")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare-backbone reference steps")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--worker", choices=KINDS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.seq_len < 8 or args.rounds < 1 or args.threads < 1:
        parser.error("need --batch >= 1, --seq-len >= 8, --rounds >= 1 and --threads >= 1")
    if args.correction_len < 1 or args.seq_len < 2 * args.batch + 4:
        parser.error("need --correction-len >= 1 and --seq-len >= 2 * --batch + 4")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Worker: one variant, built from one checkout, timed one step per request
# ----------------------------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float | None:
    """This process's resident-set high-water mark (Linux VmHWM), MB."""
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def build_step(args: argparse.Namespace):
    """The variant's model, batch and optimizer -> (one-step function, facts about what it times)."""
    repo = str(args.repo.resolve())
    sys.path[:] = [repo] + [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]
    import torch
    from transformers import AutoModelForCausalLM

    from backbone_shapes import backbone_config

    torch.set_num_threads(args.threads)
    config = backbone_config(args.shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(config)
    vocab = config.vocab_size
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, vocab - 2, (args.batch, args.seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    facts: dict = {"backbone_params": sum(p.numel() for p in backbone.parameters())}

    if args.worker == "duplex":
        import modeling_duplex
        from generation_duplex import NO_UPDATE, pack_updates

        model = modeling_duplex.DuplexForCausalLM.from_backbone(backbone)
        noise = torch.Generator().manual_seed(1)
        with torch.no_grad():  # as after training: output projections non-zero, gates open
            for module in model.modules():
                if type(module).__name__ == "ZeroInitLinear":
                    module.weight.copy_(torch.randn(module.weight.shape, generator=noise) * 0.02)
            for name, param in model.named_parameters():
                if name.endswith(".gate"):
                    param.fill_(1.0)
        updates = []
        for b in range(args.batch):  # one correction per row, a different spot in each
            at = args.seq_len // 2 - 2 * b
            correction = torch.randint(3, vocab - 2, (args.correction_len,), generator=generator).tolist()
            updates.append([(at, correction)])
        packed = pack_updates(updates)
        packed["update_is_correction"] = packed["update_positions"] != NO_UPDATE
        batch.update(packed)
        facts["code"] = modeling_duplex.__file__
        facts["duplex_config"] = {
            k: getattr(model.config, k, None) for k in ("num_slots", "workspace_update", "encoder_layers")
        }
        facts["adapted_layers"] = len(model.config.adapter_layers)
    else:
        model = backbone
        if args.worker == "bare-forward":
            model.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    facts["trainable_params"] = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0) if trainable else None
    model.train()

    def step() -> dict:
        wall, cpu = time.perf_counter(), time.process_time()
        if optimizer is None:
            with torch.no_grad():
                loss = model(**batch).loss
        else:
            optimizer.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
        return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "loss": loss.item()}

    facts["threads"] = torch.get_num_threads()
    facts["torch"] = torch.__version__
    return step, facts


def worker(args: argparse.Namespace) -> None:
    """Serve steps: `step` -> one timed step's JSON, `quit` -> exit. Protocol lines start with PREFIX."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else the libraries print goes to stderr, never into the protocol
    step, facts = build_step(args)
    facts["warmup"] = step()
    print(PREFIX + json.dumps({"ready": facts}), file=protocol)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        print(PREFIX + json.dumps(step()), file=protocol)
    facts_end = {"peak_rss_mb": peak_rss_mb()}
    print(PREFIX + json.dumps({"done": facts_end}), file=protocol)


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------


class Worker:
    """A worker process and its protocol."""

    def __init__(self, name: str, kind: str, repo: Path, args: argparse.Namespace):
        self.name = name
        command = [
            sys.executable,
            str(HERE),
            "--worker",
            kind,
            "--repo",
            str(repo),
            *("--shape", args.shape, "--batch", str(args.batch), "--seq-len", str(args.seq_len)),
            *("--correction-len", str(args.correction_len), "--threads", str(args.threads)),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONDONTWRITEBYTECODE": "1"}
        self.process = subprocess.Popen(
            command, cwd=str(repo), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.facts = self.read()["ready"]
        log(f"[{name}] ready: warm-up step {self.facts['warmup']['wall_s']:.2f} s ({self.facts.get('code', kind)})")

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX) :])
        raise RuntimeError(f"worker {self.name} exited with code {self.process.wait()}")

    def step(self) -> dict:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> dict:
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            done = self.read()["done"]
        finally:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        return done


def commit_of(repo: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def variants(args: argparse.Namespace) -> dict[str, tuple[str, Path]]:
    """name -> (worker kind, checkout)."""
    chosen = {"duplex (this checkout)": ("duplex", args.repo)}
    if args.compare is not None:
        chosen["duplex (compared checkout)"] = ("duplex", args.compare)
    if not args.no_bare:
        chosen["bare, all weights trained"] = ("bare-finetune", ROOT)
        chosen["bare, loss only (no backward)"] = ("bare-forward", ROOT)
    return chosen


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return None
    started = time.perf_counter()
    workers: dict[str, Worker] = {}
    try:
        for name, (kind, repo) in variants(args).items():  # one at a time: builds do not overlap
            workers[name] = Worker(name, kind, repo.resolve(), args)
        names = list(workers)
        steps: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                steps[name].append(workers[name].step())
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {steps[n][-1]['wall_s']:.2f} s" for n in names))
        ends = {name: w.close() for name, w in workers.items()}
    finally:
        for w in workers.values():
            if w.process.poll() is None:
                w.process.kill()
    tokens = args.batch * args.seq_len
    rows = {}
    for name in names:
        walls = [s["wall_s"] for s in steps[name]]
        cpus = [s["cpu_s"] for s in steps[name]]
        kind, repo = variants(args)[name]
        rows[name] = {
            "kind": kind,
            "repo": str(repo.resolve()),
            "commit": commit_of(repo),
            "step_s": statistics.median(walls),
            "cpu_s": statistics.median(cpus),
            "tokens_per_s": tokens / statistics.median(walls),
            "steps_s": walls,
            "losses": [s["loss"] for s in steps[name]],
            "peak_rss_mb": ends[name]["peak_rss_mb"],
            **workers[name].facts,
        }
    reference = "duplex (this checkout)"
    for name, row in rows.items():  # speed relative to this checkout's duplex step: > 1 is faster
        row["speed_vs_this_checkout"] = rows[reference]["step_s"] / row["step_s"]
        row["paired_speed_vs_this_checkout"] = statistics.median(
            [ref["wall_s"] / mine["wall_s"] for mine, ref in zip(steps[name], steps[reference], strict=True)]
        )
    results = {
        "meta": {
            "shape": args.shape,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "correction_len": args.correction_len,
            "corrections_per_row": 1,
            "rounds": args.rounds,
            "threads": args.threads,
            "dtype": "float32",
            "cpu": cpu_name(),
            "python": platform.python_version(),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "wall_seconds": time.perf_counter() - started,
        },
        "variants": rows,
    }
    if "duplex (compared checkout)" in rows:
        row = rows["duplex (compared checkout)"]
        results["this_over_compared_speed"] = 1 / row["speed_vs_this_checkout"]
        results["this_over_compared_paired_speed"] = 1 / row["paired_speed_vs_this_checkout"]
        results["this_over_compared_cpu_speed"] = row["cpu_s"] / rows["duplex (this checkout)"]["cpu_s"]
    print(markdown(results), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        log(f"wrote {args.out}")
    return results


def cpu_name() -> str:
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        match = None
    return match.group(1).strip() if match else platform.processor()


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"## Training step on CPU, {meta['shape']} shape: batch {meta['batch']} x {meta['seq_len']} tokens, "
        f"fp32, {meta['threads']} threads, median of {meta['rounds']} interleaved steps ({meta['cpu']})",
        "",
        "| variant | commit | step (s) | CPU (s) | tokens/s | speed vs this checkout | paired | peak RSS (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["variants"].items():
        commit = (row["commit"] or "?")[:7]
        lines.append(
            f"| {name} | {commit} | {row['step_s']:.3f} | {row['cpu_s']:.3f} | {row['tokens_per_s']:.1f} | "
            f"{row['speed_vs_this_checkout']:.3f}x | {row['paired_speed_vs_this_checkout']:.3f}x | "
            f"{row['peak_rss_mb'] or float('nan'):.0f} |"
        )
    if "this_over_compared_speed" in results:
        lines += [
            "",
            f"This checkout's duplex step / the compared checkout's, speed: {results['this_over_compared_speed']:.3f}x "
            f"(paired per round: {results['this_over_compared_paired_speed']:.3f}x; in process CPU time: "
            f"{results['this_over_compared_cpu_speed']:.3f}x)",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
