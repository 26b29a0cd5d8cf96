"""scripts/benchmark.py runs end to end on CPU at a tiny size and writes the expected JSON."""
import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "benchmark", Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)

TINY = ["--device", "cpu", "--spatial-size", "32", "--batch-size", "2", "--features", "4,4,8,8,16,4",
        "--feat-dim", "4", "--warmup", "1", "--iters", "1", "--eval-images", "2", "--eval-size", "32",
        "--mask-size", "40,48"]


def test_tiny_cpu_run_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    report = benchmark.main(TINY + ["--variants", "fp32,bf16+cl+foreach", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    pairs = {(r["variant"], r["impl"]) for r in report["train"]}
    assert pairs == {(v, i) for v in ("fp32", "bf16+cl+foreach") for i in ("ours", "reference")}
    for section, key in (("train", "ms_per_step"), ("propagation", "ms_fwd_bwd")):
        assert len(report[section]) == 4
        for r in report[section]:
            assert "error" not in r, r
            assert r[key] > 0 and r["saved_mb"] > 0
        saved = {(r["variant"], r["impl"]): r["saved_mb"] for r in report[section]}
        for v in ("fp32", "bf16+cl+foreach"):  # the point of the exercise, exact (saved-tensor bytes)
            assert saved[(v, "ours")] < saved[(v, "reference")]
    first = {r["impl"]: r["first_loss"] for r in report["train"] if r["variant"] == "fp32"}
    assert first["ours"] == pytest.approx(first["reference"], rel=1e-5)  # same weights, same batch
    assert [e["variant"] for e in report["eval"]] == ["fp32", "bf16+cl+foreach"]
    assert all(e["seconds"] > 0 and e["images"] == 2 for e in report["eval"])


def test_failing_variant_is_reported_not_fatal(capsys):
    # 6 is not a multiple of the 4 GroupNorm groups: building the model fails in every variant
    argv = TINY + ["--features", "6,4,8,8,16,4", "--variants", "fp32", "--eval-images", "0", "--no-propagation"]
    report = benchmark.main(argv)
    assert len(report["train"]) == 2
    assert all("num_groups" in r["error"] for r in report["train"])
    assert "ERROR" in capsys.readouterr().out


def test_bad_variant_spec_is_rejected():
    with pytest.raises(ValueError, match="bf16\\+fp32"):
        benchmark.main(TINY + ["--variants", "bf16+fp32"])


def test_end_to_end_times_the_training_data_path():
    argv = TINY + ["--variants", "fp32", "--impls", "ours", "--eval-images", "0", "--no-propagation", "--end-to-end"]
    e2e = benchmark.main(argv)["end_to_end"]
    assert e2e["iterations_per_s"] > 0 and e2e["train_images"] >= 16
