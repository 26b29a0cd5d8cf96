"""Bring your own data: a grayscale PNG dataset with its own spec and a pixel-coordinate fixation CSV with
start/end times goes through `python -m gaze` -> training -> `--test` -> `predict`, with no masks for the
training split (only the test split has masks)."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import run
from gaze.__main__ import main as gaze_main
from prepare.synthetic import make_synthetic_dataset
from tests.helpers import TINY_MODEL

SPEC = """\
name: graydemo
image_ext: .png
mask_ext: .png
gaze_ext: .png
in_channels: 1
normalization: {mean: [0.5], std: [0.25]}
heatmap: {canvas: 128, sigma: 12}
crf: null
thresholds: {2: [0.5, 0.3]}
"""


def own_dataset(root: Path) -> tuple:
    """(spec path, fixation CSV): gray PNG images, test masks only, pixel fixations with start/end in seconds."""
    src = root.parent / "src"
    kvasir_csv = make_synthetic_dataset(src, num_train=8, num_test=4, size_range=(40, 56))
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    train = (src / "train.txt").read_text().split()
    test = (src / "test.txt").read_text().split()
    for i in train + test:
        Image.open(src / "images" / f"{i}.jpg").convert("L").save(root / "images" / f"{i}.png")
    for i in test:
        Image.open(src / "masks" / f"{i}.jpg").convert("L").save(root / "masks" / f"{i}.png")
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "test.txt").write_text("\n".join(test) + "\n")
    rows = list(csv.DictReader(open(kvasir_csv)))
    out = root.parent / "fixations_px.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dicom_id", "x_position", "y_position", "timestamp_start_fixation", "timestamp_end_fixation"])
        for r in rows:  # pixels of the image, times in seconds; no size columns (read from the images)
            h, wd = float(r["IMAGE_HEIGHT"]), float(r["IMAGE_WIDTH"])
            start = float(r["CURRENT_FIX_START"]) / 1000
            w.writerow([Path(r["IMAGE"]).stem, float(r["CURRENT_FIX_X"]) * wd, float(r["CURRENT_FIX_Y"]) * h,
                        start, start + float(r["CURRENT_FIX_DURATION"]) / 1000])
    spec = root.parent / "graydemo.yaml"
    spec.write_text(SPEC)
    return spec, out, train


@pytest.mark.slow
def test_own_gray_dataset_gaze_train_test_predict(tmp_path, capsys, one_thread):
    root = tmp_path / "data"
    spec, fixations, train = own_dataset(root)
    columns = "image=dicom_id,x=x_position,y=y_position,start=timestamp_start_fixation,end=timestamp_end_fixation"
    assert gaze_main(["--csv", str(fixations), "--root", str(root), "--data", str(spec), "--coords", "pixels",
                      "--columns", columns, "--workers", "1", "--quiet"]) == 0
    maps = sorted((root / "gaze" / "heatmap").glob("*.png"))
    assert len(maps) == 12 and not (root / "gaze" / "crf_compat1").exists()  # crf: null -> heatmaps only
    assert not any((root / "masks" / f"{i}.png").exists() for i in train)

    exp = tmp_path / "exp"
    argv = ["--data", str(spec), "--root", str(root), "--exp_path", str(exp), "--num_worker", "0", "-bs", "4",
            "--opt", "sgd", "--lr", "1e-2", "--in_channels", "1", "--max_ite", "6", "--val_step", "3",
            "--log_step", "3", "--save_step", "6", "--quiet"] + TINY_MODEL
    assert run.main(argv) == 0
    runs = list((exp / "0" / "graydemo").iterdir())  # the run folder is named by the spec's name
    assert len(runs) == 1
    run_dir = runs[0]
    recorded = json.loads((run_dir / "metrics.json").read_text())
    assert recorded["final"]["num_images"] == 4

    assert run.main(["--test", "--ckpt_path", str(run_dir / "model_latest.pth"), "--exp_path", str(exp),
                     "--quiet"]) == 0
    tests = sorted(p for p in (exp / "0" / "graydemo").iterdir() if p != run_dir)
    again = json.loads((tests[-1] / "metrics.json").read_text())["test"]
    for key in ("mdice", "miou", "mdice_1", "mdice_2"):
        assert again[key] == recorded["final"][key]

    out = tmp_path / "pred"
    image = root / "images" / f"{train[0]}.png"
    assert run.main(["predict", "--ckpt_path", str(run_dir), "--input", str(image), "--out", str(out),
                     "--quiet"]) == 0
    mask = np.asarray(Image.open(out / f"{train[0]}_mask.png"))
    assert mask.shape == np.asarray(Image.open(image)).shape and set(np.unique(mask)) <= {0, 255}
