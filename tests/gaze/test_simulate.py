"""Simulated gaze: the CSV goes through `python -m gaze` unchanged, the model refits to what it simulates,
seeds reproduce, errors are one line."""
import csv
import json

import numpy as np
import pytest

from gaze.__main__ import main as gaze_main
from gaze.fixations import read_fixations
from gaze.simulate import GazeModel, fit_model, gaze_statistics, image_rng, simulate_image
from prepare.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(root, num_train=6, num_test=2, size_range=(40, 56))
    return root


def blob(h=120, w=160, cy=60, cx=70, ry=30, rx=40) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 / ry ** 2 + (xx - cx) ** 2 / rx ** 2 <= 1


def test_simulated_csv_goes_through_the_gaze_pipeline_unchanged(root, tmp_path, capsys):
    out = tmp_path / "sim.csv"
    assert gaze_main(["simulate", "--root", str(root), "--out", str(out), "--seed", "3"]) == 0
    header = next(csv.reader(open(out)))
    assert header == next(csv.reader(open(root / "fixations.csv")))  # the GazeMedSeg columns, in order
    fixations = read_fixations(out)
    assert len(fixations) == 8 and all(len(f.xs) >= GazeModel().count_min for f in fixations.values())
    maps = tmp_path / "maps"
    assert gaze_main(["--csv", str(out), "--root", str(root), "--data", "kvasir", "--out", str(maps),
                      "--workers", "1", "--steps", "heatmap", "--quiet", "--no-sheet"]) == 0
    assert len(list((maps / "heatmap").glob("*.jpg"))) == 8
    report = json.loads((maps / "report.json").read_text())
    assert report["dice"]["heatmap"]["n"] == 8 and report["dice"]["heatmap"]["soft_gt"] > 0.3
    again = tmp_path / "again.csv"
    assert gaze_main(["simulate", "--root", str(root), "--out", str(again), "--seed", "3"]) == 0
    assert again.read_bytes() == out.read_bytes()  # the seed reproduces the file


@pytest.mark.slow
def test_simulation_follows_the_model():
    model, mask = GazeModel(), blob()
    sims = [simulate_image(mask, model, image_rng(0, f"i{k}")) for k in range(120)]
    counts = [len(s) for s in sims]
    expected = model.count_a + model.count_b * np.sqrt(mask.mean())
    assert abs(np.mean(counts) - expected) < 2 and min(counts) >= model.count_min
    xy = np.concatenate([s[:, :2] for s in sims])
    inside = mask[(xy[:, 1] * 120).astype(int), (xy[:, 0] * 160).astype(int)]
    share = (model.p_first + (np.mean(counts) - 1) * model.p_inside) / np.mean(counts)
    assert abs(inside.mean() - share) < 0.03
    durations = np.concatenate([s[:, 2] for s in sims])
    assert durations.min() >= model.min_duration
    starts = sims[0][:, 3]
    assert np.all(np.diff(starts) >= sims[0][:-1, 2])  # fixations do not overlap in time


@pytest.mark.slow
def test_fit_recovers_the_model_it_simulated():
    from gaze.fixations import FixationSet

    truth = GazeModel(count_a=6.0, count_b=30.0, count_sd=2.0, p_first=0.3, p_inside=0.7,
                      log_dur_in=[5.9, 0.3], log_dur_out=[5.3, 0.5])
    rng = np.random.default_rng(0)
    masks, fixations = {}, {}
    for k in range(100):
        m = blob(cy=int(rng.integers(40, 80)), cx=int(rng.integers(50, 110)), ry=int(rng.integers(10, 35)),
                 rx=int(rng.integers(10, 45)))
        f = simulate_image(m, truth, image_rng(1, str(k)))
        masks[str(k)] = m
        fixations[str(k)] = FixationSet(str(k), f[:, 0], f[:, 1], f[:, 2], 120, 160, np.arange(len(f)))
    fitted = fit_model(fixations, masks, "sim")
    assert fitted.count_b == pytest.approx(30.0, abs=5) and fitted.count_a == pytest.approx(6.0, abs=2)
    assert fitted.p_first == pytest.approx(0.3, abs=0.08) and fitted.p_inside == pytest.approx(0.7, abs=0.03)
    assert fitted.log_dur_in[0] == pytest.approx(5.9, abs=0.03)
    assert fitted.log_dur_out[1] == pytest.approx(0.5, abs=0.03)
    assert np.allclose(fitted.depth_probs, truth.depth_probs, atol=0.03)
    stats = gaze_statistics(fixations, masks)
    assert stats["images"] == 100 and 0.6 < stats["inside_share"] < 0.8


def test_empty_mask_gets_uniform_fixations():
    f = simulate_image(np.zeros((50, 60), bool), GazeModel(), image_rng(0, "e"))
    assert len(f) >= GazeModel().count_min and (f[:, :2] >= 0).all() and (f[:, :2] < 1).all()


def test_refit_writes_the_model_and_errors_are_one_line(root, tmp_path, capsys):
    out = tmp_path / "sim.csv"
    assert gaze_main(["simulate", "--root", str(root), "--out", str(out), "--fit", str(root / "fixations.csv")]) == 0
    model = json.loads((tmp_path / "sim.csv.model.json").read_text())
    assert model["fitted_on"].endswith("(8 images)") and len(model["depth_probs"]) == 10
    capsys.readouterr()
    for argv, expect in ((["--root", str(tmp_path), "--out", str(out)], "no masks folder"),
                         (["--root", str(root), "--out", str(tmp_path / "no" / "x.csv")], "does not exist"),
                         (["--root", str(root), "--out", str(out), "--fit", str(tmp_path / "x.csv")], "not found")):
        assert gaze_main(["simulate", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
