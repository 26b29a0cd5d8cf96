"""scripts/benchmark.py runs end to end on CPU at a tiny size and writes the expected JSON."""
import json

import pytest

from scripts import benchmark

TINY = ["--device", "cpu", "--spatial-size", "32", "--batch-size", "2", "--features", "4,4,8,8,16,4",
        "--feat-dim", "4", "--warmup", "1", "--iters", "1", "--eval-images", "2", "--eval-size", "32",
        "--mask-size", "40,48"]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_end_to_end_times_the_training_data_path():
    argv = TINY + ["--variants", "fp32", "--impls", "ours", "--eval-images", "0", "--no-propagation", "--end-to-end"]
    report = benchmark.main(argv)
    e2e = report["end_to_end"]
    assert e2e["iterations_per_s"] > 0 and e2e["train_images"] >= 16 and e2e["variant"] == "fp32"
    assert "% of the bare step rate" in benchmark.table(report)  # compared with the fp32 / ours step


@pytest.mark.slow
def test_step_flops_count_forward_and_backward_convolutions():
    import torch
    args = benchmark.parse_args(TINY)
    tflop = benchmark.step_tflop(args)["tflop_per_step"]
    # forward convolution FLOPs from the layer shapes: 2 * output elements * (in / groups) * kernel area
    forward = 0

    def count(module, inputs, output):
        nonlocal forward
        kernel = module.kernel_size[0] * module.kernel_size[1]
        if isinstance(module, torch.nn.ConvTranspose2d):  # each input element spreads over out/groups maps
            forward += 2 * inputs[0].numel() * module.out_channels // module.groups * kernel
        else:
            forward += 2 * output.numel() * module.in_channels // module.groups * kernel

    model = benchmark.gaze_model(args, "none")  # the model step_tflop counts: no propagation
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.register_forward_hook(count)
    model(torch.randn(args.batch_size, 3, args.spatial_size, args.spatial_size))
    # backward = input grads + weight grads (2x forward), minus the first layer's input grad (the image)
    first = args.num_levels * 2 * args.batch_size * args.spatial_size ** 2 * args.features[0] * 3 * 9
    assert tflop * 1e12 == pytest.approx(3 * forward - first, rel=1e-6)


@pytest.mark.slow
def test_leave_one_out_and_profile(tmp_path):
    prof = tmp_path / "profile.txt"
    argv = TINY + ["--variants", "fp32", "--impls", "ours,none", "--eval-images", "0", "--no-propagation",
                   "--profile", str(prof), "--profile-iters", "1"]
    report = benchmark.main(argv)
    ms = {r["impl"]: r["ms_per_step"] for r in report["train"]}
    assert set(ms) == {"ours", "none"}
    text = prof.read_text()
    assert "== fp32 / ours: 1 steps ==" in text and "== fp32 / none: 1 steps ==" in text
    assert "aten::convolution" in text
    assert "propagation inside the fp32 step" in benchmark.table(report)


def test_triton_is_selected_through_build_model(monkeypatch):
    """The benchmark selects Triton through build_model: without a CUDA device both measurements stop at
    the build-time refusal (main records it per measurement, as test_failing_variant_is_reported_not_fatal)."""
    from common.errors import UserError
    monkeypatch.setattr(benchmark.torch.cuda, "is_available", lambda: False)  # also on a machine that has one
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = benchmark.parse_args(TINY)
    for measure in (benchmark.bench_train, benchmark.bench_propagation):
        with pytest.raises(UserError, match="^--propagation triton:"):
            measure(args, "fp32", "triton", benchmark.torch.device("cpu"))
