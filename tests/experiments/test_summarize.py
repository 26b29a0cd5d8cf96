"""`run.py summarize`: run folders written here in the documented format (config.yaml, metrics.json,
losses.csv) with known numbers; the summary must equal a direct computation from them."""
import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml
from PIL import Image

from common.errors import UserError
from experiments import summarize


def write_run(exp: Path, name: str, seed: int, stamp: str, *, max_ite: int = 6, final=None, best=None,
              history=None, selected_on: str = "test", seconds: float = 60.0, data: str = "kvasir",
              test: bool = False, **settings) -> Path:
    """A run folder as run.py writes it; metrics.json only when `final` is given (a finished run)."""
    run = exp / str(seed) / data / f"{name}_{stamp}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"run_name": name, "seed": seed, "max_ite": max_ite,
                                                     "data": data, "test": test, **settings}))
    (run / "losses.csv").write_text("iteration,lr,loss\n2,1e-2,0.5\n4,1e-2,0.4\n")
    if final is not None:
        final_iteration = final.pop("final_iteration", max_ite)
        (run / "metrics.json").write_text(json.dumps({
            "final_iteration": final_iteration, "final": final,
            "best": {"iteration": best["iteration"], "selected_on": selected_on, "mdice": best["mdice"],
                     "test": best},
            "history": history or [], "train_seconds": seconds, "device": "cpu"}))
    return run


def metrics(dice: float, iou: float, hd95: float | None = None) -> dict:
    out = {"mdice": dice, "miou": iou, "num_images": 4}
    if hd95 is not None:
        out["mhd95"] = hd95
    return out


@pytest.fixture
def exp(tmp_path) -> Path:
    exp = tmp_path / "exp"
    # preset A: 3 finished seeds with curves
    for seed, (fd, fi, hd, bd, sec) in enumerate([(0.70, 0.55, 12.0, 0.74, 60.0), (0.64, 0.50, 15.5, 0.69, 90.0),
                                                    (0.77, 0.61, 9.0, 0.78, 75.0)]):
        hist = [{"iteration": 2, "test": metrics(0.3 + seed / 10, 0.2)}, {"iteration": 4, "test": metrics(bd, 0.5)},
                {"iteration": 6, "test": metrics(fd, fi, hd)}]
        write_run(exp, "presetA", seed, "20260101-000000", final=metrics(fd, fi, hd),
                  best=dict(metrics(bd, fi), iteration=4), history=hist, seconds=sec)
    # preset B: one seed finished (selected on validation), one interrupted, one stopped early
    write_run(exp, "presetB", 0, "20260101-000000", final=metrics(0.5, 0.4, 20.0),
              best=dict(metrics(0.52, 0.41), iteration=4), selected_on="val",
              history=[{"iteration": 6, "test": metrics(0.5, 0.4)}])
    write_run(exp, "presetB", 1, "20260101-000000")  # no metrics.json: interrupted
    write_run(exp, "presetB", 2, "20260101-000000", final=dict(metrics(0.9, 0.8, 1.0), final_iteration=4),
              best=dict(metrics(0.9, 0.8), iteration=4))
    # preset C: HD95 undefined (null in metrics.json) for one of two seeds
    for seed, hd in ((0, 7.0), (1, None)):
        write_run(exp, "presetC", seed, "20260101-000000", final=dict(metrics(0.6, 0.5), mhd95=hd),
                  best=dict(metrics(0.6, 0.5), iteration=6))
    # an older finished copy of presetA seed 0 (a rerun): listed as a duplicate, not averaged twice
    write_run(exp, "presetA", 0, "20251231-000000", final=metrics(0.1, 0.1, 50.0),
              best=dict(metrics(0.1, 0.1), iteration=2))
    # a --test evaluation folder is not a training run
    write_run(exp, "presetA", 0, "20260102-000000", test=True)
    return exp


def read_csv(path: Path) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_summary_equals_a_direct_computation(exp, capsys):
    assert summarize.main([str(exp)]) == 0
    rows = {r["preset"]: r for r in read_csv(exp / "summary.csv")}
    assert set(rows) == {"presetA", "presetB", "presetC"}
    a = rows["presetA"]
    assert a["n"] == "3" and a["seeds"] == "0 1 2" and a["selected_on"] == "test"
    for col, values in {"final_dice": [70, 64, 77], "best_dice": [74, 69, 78], "final_iou": [55, 50, 61],
                        "final_hd95": [12.0, 15.5, 9.0], "train_minutes": [1.0, 1.5, 1.25]}.items():
        assert float(a[f"{col}_mean"]) == pytest.approx(statistics.mean(values), abs=1e-9), col
        assert float(a[f"{col}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-9), col  # ddof=1
    b = rows["presetB"]  # only the one finished seed is averaged; one seed has no std
    assert b["n"] == "1" and b["seeds"] == "0" and b["selected_on"] == "val"
    assert float(b["final_dice_mean"]) == pytest.approx(50) and b["final_dice_std"] == ""

    c = rows["presetC"]
    assert (float(c["final_hd95_mean"]), c["final_hd95_std"], c["final_hd95_n"], c["n"]) == (7.0, "", "1", "2")

    md = (exp / "summary.md").read_text()
    assert "| 7.00 (1 of 2) |" in md
    assert "| kvasir | presetA | gaze | - | 3 | 0 1 2 | 70.33 ± 6.51 | 73.67 ± 4.51 | test |" in md
    not_averaged = md.split("## Not averaged")[1]
    assert "| presetB | 1 | unfinished | no metrics.json; last logged iteration 4, no checkpoint |" in not_averaged
    assert "| presetB | 2 | stopped_early | final_iteration 4 < max_ite 6 |" in not_averaged
    assert "| presetA | 0 | duplicate |" in not_averaged
    assert "1 evaluation-only" in md
    status = {(r["preset"], r["seed"], r["folder"].split("_")[-1]): r["status"] for r in read_csv(exp / "runs.csv")}
    assert status[("presetA", "0", "20251231-000000")] == "duplicate"
    assert status[("presetB", "1", "20260101-000000")] == "unfinished"

    printed = capsys.readouterr().out
    assert "70.33 ± 6.51" in printed and "not averaged" in printed
    with Image.open(exp / "curves.png") as im:
        im.verify()
    with Image.open(exp / "curves.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200


def test_curve_points_are_the_history():
    run = summarize.Run(Path("x"), "kvasir", "p", 0, 6, "finished", metrics={"history": [
        {"iteration": 2, "test": {"mdice": 0.25}}, {"iteration": 4, "test": {"mdice": 0.5}, "val": {"mdice": 0.9}}]})
    assert summarize.curve(run) == {2: 25.0, 4: 50.0}


def test_mean_std_is_sample_std():
    assert summarize.mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(statistics.stdev([1, 2, 4])))
    mean, std = summarize.mean_std([3.0])
    assert mean == 3.0 and math.isnan(std)  #: no spread from one seed


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_nothing_to_summarise_is_a_user_error(tmp_path, make):
    exp = tmp_path / "exp"
    if make == "empty":
        exp.mkdir()
    with pytest.raises(UserError, match=str(exp)):
        summarize.main([str(exp)])
    assert not (exp / "summary.csv").exists()


def test_supervision_kind_names_each_annotation():
    from experiments.summarize import supervision_kind
    assert supervision_kind({"method": "full_sup"}) == "full"
    assert supervision_kind({"method": "gaze_sup", "gaze_dir": "crf_compat1"}) == "gaze"
    assert supervision_kind({"method": "gaze_sup", "gaze_dir": "box_crf"}) == "box+CRF"
    assert supervision_kind({"method": "gaze_sup", "gaze_dir": "crf_compat1", "ignore_below": [0.3]}) == "gaze+band"
    assert supervision_kind({"method": "gaze_sup", "gaze_dir": "sim/crf_compat1"}) == "simulated gaze"
    assert supervision_kind({"method": "sparse_sup", "label_dir": "scribbles"}) == "scribbles"


def test_runs_that_share_a_name_but_not_their_settings_are_separate_rows(tmp_path, capsys):
    """An adam/64 px run and an sgd/48 px run under the same name are two experiments: two rows, each saying
    how it differs. Seeds and flags that cannot change results (workers, device, log step) do not split a row."""
    exp = tmp_path / "exp"
    for seed, workers in ((0, 0), (1, 4)):
        write_run(exp, "same", seed, "20260101-000000", final=metrics(0.7, 0.5), best=dict(metrics(0.7, 0.5),
                  iteration=6), opt="adam", spatial_size=64, num_worker=workers, device=str(seed), log_step=seed + 1)
    write_run(exp, "same", 0, "20260102-000000", final=metrics(0.3, 0.2), best=dict(metrics(0.3, 0.2),
              iteration=6), opt="sgd", spatial_size=48)
    assert summarize.main([str(exp), "--no_plot"]) == 0
    rows = read_csv(exp / "summary.csv")
    assert [(r["preset"], r["settings"], r["n"]) for r in rows] == [
        ("same", "opt adam, spatial_size 64", "2"), ("same", "opt sgd, spatial_size 48", "1")]
    assert float(rows[1]["final_dice_mean"]) == pytest.approx(30)
    # the sgd run is not a "duplicate" of seed 0's adam run: both are finished runs of their own experiment
    assert all(r["status"] == "finished" for r in read_csv(exp / "runs.csv"))


def test_a_malformed_run_is_listed_and_the_rest_summarised(tmp_path, capsys):
    exp = tmp_path / "exp"
    write_run(exp, "good", 0, "20260101-000000", final=metrics(0.7, 0.5), best=dict(metrics(0.7, 0.5), iteration=6))
    bad_time = write_run(exp, "good", 1, "20260101-000000", final=metrics(0.6, 0.5),
                         best=dict(metrics(0.6, 0.5), iteration=6), seconds="an hour")
    bad_config = write_run(exp, "good", 2, "20260101-000000", final=metrics(0.5, 0.5),
                           best=dict(metrics(0.5, 0.5), iteration=6))
    text = (bad_config / "config.yaml").read_text().replace("max_ite: 6", "max_ite: sixty")
    (bad_config / "config.yaml").write_text(text)
    assert summarize.main([str(exp), "--no_plot"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    rows = read_csv(exp / "summary.csv")
    assert [(r["preset"], r["n"]) for r in rows] == [("good", "1")]
    listed = {r["folder"]: (r["status"], r["why"]) for r in read_csv(exp / "runs.csv")}
    assert listed[str(bad_time.relative_to(exp))] == ("unreadable", "metrics.json: train_seconds 'an hour' is not a "
                                                                    "number")
    assert listed[str(bad_config.relative_to(exp))] == ("unreadable", "config.yaml: max_ite 'sixty' is not an "
                                                                      "integer")


def test_overlapping_curves_differ_in_dashes_and_markers():
    from experiments.summarize import line_style

    looks = [line_style(i) for i in range(12)]
    for a, b in zip(looks, looks[1:]):  # neighbours (near-equal presets sort together) differ in every respect
        assert a["color"] != b["color"] and a["linestyle"] != b["linestyle"] and a["marker"] != b["marker"]
    assert len({(s["linestyle"], s["marker"]) for s in looks}) == 12
