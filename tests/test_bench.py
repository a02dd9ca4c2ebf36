"""Smoke test of the performance benchmark on a micro backbone: it runs end to end and reports every figure."""

import importlib.util
import json
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
