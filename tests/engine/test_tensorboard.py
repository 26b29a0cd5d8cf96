"""What a training run leaves for the researcher: TensorBoard scalars and images, the progress bar, the
resolved config.yaml (and the shipped --config files), --save_pred PNGs and per_image_metrics.csv.
"""
import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import run
from parse_args import COMMANDS, parse_args
from tests.helpers import only_run_dir, tiny_argv

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """One 4-iteration run, evaluated at 2 and 4, with the progress bar on and --save_pred."""
    exp = tmp_path_factory.mktemp("exp")
    argv = tiny_argv(data_root, exp, "--max_ite", "4", "--val_step", "2", "--log_step", "2", "--save_pred")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run.main(argv) == 0
    return {"dir": only_run_dir(exp), "argv": argv, "stderr": err.getvalue()}


def events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_scalars_match_losses_csv_and_metrics_json(trained):
    acc = events(trained["dir"])
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/loss_seg_1", "train/loss_seg_2", "train/loss_cons", "train/lr",
                "test/mdice", "test/mdice_1", "test/mdice_2", "test/miou", "test/miou_1", "test/miou_2",
                "test/mhd95", "test/num_images"}
    assert expected <= tags, expected - tags
    with open(trained["dir"] / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ("loss", "loss_seg_1", "loss_seg_2", "loss_cons", "lr"):
        logged = acc.Scalars(f"train/{key}")
        assert [e.step for e in logged] == [int(r["iteration"]) for r in rows] == [2, 4]
        np.testing.assert_allclose([e.value for e in logged], [float(r[key]) for r in rows], rtol=1e-6)
    history = json.loads((trained["dir"] / "metrics.json").read_text())["history"]
    for key in ("mdice", "mdice_1", "miou_2"):
        logged = acc.Scalars(f"test/{key}")
        assert [e.step for e in logged] == [h["iteration"] for h in history] == [2, 4]
        np.testing.assert_allclose([e.value for e in logged], [h["test"][key] for h in history], rtol=1e-6)


def _decode(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def test_images_show_reference_and_prediction_contours(trained):
    acc = events(trained["dir"])
    tags = set(acc.Tags()["images"])
    assert {"images/test", "images/train_level_1", "images/train_level_2"} <= tags, tags
    for tag in ("images/test", "images/train_level_1", "images/train_level_2"):
        logged = acc.Images(tag)
        assert [e.step for e in logged] == [2, 4]
        grid = _decode(logged[-1])
        # 4 panels of 32 px in a grid; every synthetic image has a polyp, so its reference outline (red) shows
        assert grid.shape[0] >= 32 and grid.shape[1] >= 4 * 32
        red = (grid[..., 0] == 255) & (grid[..., 1] == 0) & (grid[..., 2] == 0)
        assert red.sum() >= 4 * 8, f"{tag}: too few reference-contour pixels ({red.sum()})"


def test_progress_bar_shows_rate_and_loss(trained):
    err = trained["stderr"]
    assert "train:" in err and ("it/s" in err or "s/it" in err) and "loss=" in err and "lr=" in err, err[-500:]


def test_resolved_config_round_trips(trained):
    """config.yaml records the resolved values: the flags (not the commands), and the thresholds the spec
    supplied (not null)."""
    saved = yaml.safe_load((trained["dir"] / "config.yaml").read_text())
    flags = {k: v for k, v in vars(parse_args(trained["argv"])).items() if k not in COMMANDS}
    assert saved == {**flags, "thresholds": [0.5, 0.3]}  # kvasir's 2-level table
    again = vars(parse_args(["--config", str(trained["dir"] / "config.yaml")]))
    assert {k: v for k, v in again.items() if k not in COMMANDS} == saved


PAPER_KVASIR = ("-m gaze_sup --data kvasir --model unet -bs 8 --spatial_size 224 --in_channels 3 --opt sgd --lr 1e-2 "
                "--lr_min 1e-4 --lr_scheduler cos --max_ite 15000 --num_levels 2 --cons_mode prop --cons_weight 3 "
                "--data_size_rate 1 --seed 0")


@pytest.mark.parametrize("name,flags", [
    ("kvasir_gaze_sup_2_levels.yaml", PAPER_KVASIR),
    ("prostate_gaze_sup_2_levels.yaml",
     PAPER_KVASIR.replace("--data kvasir", "--data prostate").replace("--in_channels 3", "--in_channels 1")),
])
def test_shipped_configs_equal_the_papers_command_lines(name, flags):
    path = REPO / "configs" / name
    from_file = vars(parse_args(["--config", str(path)]))
    from_flags = vars(parse_args(flags.split()))
    assert {k: v for k, v in from_file.items() if k != "config"} == {k: v for k, v in from_flags.items()
                                                                      if k != "config"}
    assert parse_args(["--config", str(path), "--lr", "0.5", "-bs", "2"]).lr == 0.5  # flags override the file
    assert parse_args(["--config", str(path), "-bs", "2"]).batch_size == 2


def test_save_pred_and_per_image_metrics(trained, data_root):
    test_ids = (data_root / "test.txt").read_text().split()
    pred_dir = trained["dir"] / "predictions"
    for folder in ("pred", "pred_1", "pred_2"):
        assert sorted(p.stem for p in (pred_dir / folder).glob("*.png")) == sorted(test_ids), folder
    with open(trained["dir"] / "per_image_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "dice", "iou", "hd95", "dice_1", "iou_1", "dice_2", "iou_2"]
    assert [r["id"] for r in rows] == test_ids
    for r in rows:  # the saved PNGs are the evaluated predictions: recompute Dice / IoU from them
        gt = np.asarray(Image.open(data_root / "masks" / f"{r['id']}.jpg").convert("L"), np.float32) / 255 > 0.5
        for suffix in ("", "_1", "_2"):
            pred = np.asarray(Image.open(pred_dir / f"pred{suffix}" / f"{r['id']}.png")) > 127
            assert pred.shape == gt.shape  # original size
            inter, total = (pred & gt).sum(), pred.sum() + gt.sum()
            assert float(r["dice" + suffix]) == pytest.approx(2 * inter / (total + 1e-7), abs=2e-6)
            assert float(r["iou" + suffix]) == pytest.approx(inter / (total - inter + 1e-7), abs=2e-6)
