"""Smoke test of the performance benchmark on a micro backbone: it runs end to end and reports every figure."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_duplex.py"


def load_bench():
    """bench/ is a folder of scripts, not a package: load the module from its file."""
    spec = importlib.util.spec_from_file_location("bench_duplex", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_micro_reports_every_figure(tmp_path: Path) -> None:
    bench = load_bench()
    contexts = [16, 32]
    argv = ["--shape", "micro", "--contexts", *map(str, contexts), "--new-tokens", "4", "--repeats", "1"]
    results = bench.main([*argv, "--threads", "1", "--sweep-placement", "--out", str(tmp_path)])

    saved = json.loads(Path(results["files"]["json"]).read_text())
    for variant in bench.VARIANTS:
        assert saved["decode"][variant]["decode_tok_s"] > 0
        assert saved["decode"][variant]["end_to_end_tok_s"] > 0
    assert sorted(int(length) for length in saved["latency"]) == contexts
    for row in saved["latency"].values():
        for mode in bench.MODES:
            assert row[f"{mode}_ms"] > 0
        assert row["decode_step_ms"] > 0 and row["decode_speed_after_correction"] > 0
    assert saved["params"]["trainable"] > 0 and saved["params"]["frozen"] > 0
    assert saved["params"]["adapter_weights_mb"] > 0
    assert all(row["decode_tok_s"] > 0 for row in saved["placement"])
    assert Path(results["files"]["markdown"]).read_text().startswith("## Duplex benchmark")
    if results["files"]["plot"] is not None:
        assert Path(results["files"]["plot"]).stat().st_size > 0


def test_bench_model_reads_every_update(tmp_path: Path) -> None:
    """The benchmark times corrections being read: its trained-looking model must decide every update a correction
    (a backchannel writes nothing, so a step after it would read nothing and time only the backbone)."""
    load_bench()  # puts bench/ on sys.path
    import torch
    from bench_models import build_backbone, build_duplex, random_ids, update_schedule

    backbone = build_backbone("micro", torch.device("cpu"), torch.float32, False, tmp_path)
    model = build_duplex(backbone)
    vocab = backbone.config.vocab_size
    prompt = random_ids(8, vocab, 0, torch.device("cpu"))
    updates = update_schedule(8, 3, 4, vocab)
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        updates=updates,
        return_dict_in_generate=True,
        pad_token_id=backbone.config.pad_token_id,
    )
    assert [landing.kind for landing in out.update_landings[0]] == ["correction"] * len(updates)


def load_script(name: str):
    """A script of bench/ loaded from its file (it puts the repository root and bench/ on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, BENCH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GPU_SMOKE = ["--device", "cpu", "--shape", "micro", "--train-seq", "64", "--train-batch", "2", "--train-steps", "2"]
GPU_SMOKE += ["--contexts", "48", "96", "--decode-tokens", "4", "--repeats", "2", "--threads", "1"]


def check_gpu_report(saved: dict, bench, contexts: list[int]) -> None:
    """The fields of bench_gpu.py's report, and what they must say on any device."""
    assert "error" not in json.dumps(saved)
    train = saved["train"]
    assert train["activation_checkpointing"] and train["seq_len"] == 64 and train["batch"] == 2
    assert train["tokens_per_step"] == 128 and train["corrections_per_row"] == 2
    for variant in bench.TRAIN_VARIANTS:
        row = train["variants"][variant]
        assert row["tokens_per_s"] > 0 and len(row["steps_s"]) == 2
        assert row["tokens_per_s"] == pytest.approx(128 / row["step_s"])
        assert all(math.isfinite(loss) for loss in row["losses"])
    # the corrections are read in training: their gradients reach the duplex modules
    assert train["variants"]["with corrections"]["duplex_grad_norm"] > 0
    assert train["speed_with_over_without"] > 0
    decode = saved["decode"]["contexts"]
    assert sorted(int(length) for length in decode) == contexts
    for rows in decode.values():
        assert list(rows) == list(bench.DECODE_VARIANTS)
        assert rows["bare"]["ratio_vs_bare"] == 1.0
        for row in rows.values():
            assert row["tokens_per_s"] > 0 and len(row["blocks_tokens_per_s"]) == 2
            assert row["ratio_vs_bare"] == pytest.approx(row["tokens_per_s"] / rows["bare"]["tokens_per_s"])
        # without corrections the duplex model is its backbone; with one, the read changes the logits
        assert rows["duplex"]["first_step_logit_change_vs_bare"] == 0.0
        assert rows["duplex+correction"]["first_step_logit_change"] > 0
    meta = saved["meta"]
    assert meta["shape"] == "micro" and meta["backbone_params"] > 0 and meta["duplex_trainable_params"] > 0


def test_bench_gpu_runs_on_cpu(tmp_path: Path, capsys) -> None:
    """bench_gpu.py's CPU smoke run (fp32, CPU kernels): both phases, every field of its report."""
    bench = load_script("bench_gpu")
    out = tmp_path / "gpu.json"
    results = bench.main([*GPU_SMOKE, "--dtype", "float32", "--out", str(out)])
    saved = json.loads(out.read_text())
    check_gpu_report(saved, bench, [48, 96])
    assert saved["meta"]["dtype"] == "float32" and results["meta"]["argv"][-1] == str(out)
    assert "| with corrections |" in capsys.readouterr().out


def test_bench_gpu_cuda_code_path_on_cpu(tmp_path: Path, monkeypatch) -> None:
    """What the GPU run takes: a bf16 backbone under fp32 duplex modules (bf16 autocast in training) and the
    reference read (CUDA has no fused kernel returning the log-sum-exp), here on CPU."""
    bench = load_script("bench_gpu")
    import attention_duplex

    monkeypatch.setattr(attention_duplex, "fast_attention_with_lse", attention_duplex.attention_with_lse)
    out = tmp_path / "gpu.json"
    bench.main([*GPU_SMOKE, "--dtype", "bfloat16", "--out", str(out)])
    saved = json.loads(out.read_text())
    check_gpu_report(saved, bench, [48, 96])
    assert saved["meta"]["dtype"] == "bfloat16" and saved["train"]["autocast"] == "bfloat16"


def test_bench_gpu_takes_the_repository_duplex_config() -> None:
    """The Qwen3-1.7B shape gets config.json's duplex fields, sized ones included; other shapes only the unsized."""
    bench = load_script("bench_gpu")
    saved = json.loads((BENCH.parents[1] / "config.json").read_text())
    fields = bench.duplex_fields("qwen3-1.7b")
    assert fields["adapter_layers"] == saved["adapter_layers"] == list(range(28))
    assert fields["num_slots"] == saved["num_slots"] and fields["encoder_heads"] == saved["encoder_heads"]
    assert not set(bench.SIZED_FIELDS) & set(bench.duplex_fields("micro"))


@pytest.mark.slow
def test_bench_train_step_times_a_checkout(tmp_path: Path) -> None:
    """bench_train_step.py end to end (one worker process, this checkout): the duplex step with a correction."""
    bench = load_script("bench_train_step")
    out = tmp_path / "train.json"
    argv = ["--shape", "micro", "--seq-len", "32", "--batch", "2", "--rounds", "2", "--threads", "1", "--no-bare"]
    results = bench.main([*argv, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(results))
    (row,) = saved["variants"].values()
    assert row["kind"] == "duplex" and row["code"] == str(BENCH.parents[1] / "modeling_duplex.py")
    assert len(row["steps_s"]) == 2 and row["tokens_per_s"] == pytest.approx(64 / row["step_s"])
    assert row["trainable_params"] > 0 and row["speed_vs_this_checkout"] == 1.0
    assert all(math.isfinite(loss) for loss in row["losses"])
