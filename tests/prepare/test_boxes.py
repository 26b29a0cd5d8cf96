"""Box supervision: filled boxes and box+CRF maps written as gaze maps by `python -m prepare kvasir --boxes`."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.dataspec import load_spec
from datasets.io import DataError, read_gray
from gaze import crf as crf_mod
from gaze.heatmap import to_uint8
from gaze.pipeline import load_crf_image
from prepare.boxes import BOX_PRIOR, box_mask, box_prior, make_box_maps, map_dice_report, read_boxes
from prepare.cli import main as prepare_main
from prepare.synthetic import polyp_image

SPEC = load_spec("kvasir")


def bounding_box(mask: np.ndarray) -> dict:
    """The tight box of a binary mask in the Kvasir-SEG format (xmax, ymax exclusive)."""
    ys, xs = np.nonzero(mask)
    return {"label": "polyp", "xmin": int(xs.min()), "ymin": int(ys.min()),
            "xmax": int(xs.max()) + 1, "ymax": int(ys.max()) + 1}


def make_source(src: Path, n: int = 3, size: int = 48) -> dict:
    """SRC/images, SRC/masks (synthetic polyps) and SRC/boxes.json with each mask's tight box; returns the JSON."""
    rng = np.random.RandomState(3)
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    boxes = {}
    for k in range(n):
        h, w = size, size + 4 * k
        image, mask, _ = polyp_image(rng, h, w)
        Image.fromarray(image).save(src / "images" / f"p{k}.jpg", quality=95)
        Image.fromarray(mask.astype(np.uint8) * 255).save(src / "masks" / f"p{k}.jpg")
        boxes[f"p{k}"] = {"height": h, "width": w, "bbox": [bounding_box(mask)]}
    (src / "boxes.json").write_text(json.dumps(boxes))
    return boxes


def prepared(tmp_path: Path, n: int = 3) -> tuple:
    src = tmp_path / "src"
    boxes = make_source(src, n)
    root = tmp_path / "root"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
        for p in (src / sub).iterdir():
            (root / sub / p.name).symlink_to(p)
    return src, root, boxes


def test_box_mask_is_the_union_of_half_open_boxes():
    rng = np.random.default_rng(0)
    h, w = 23, 31
    boxes = []
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
        boxes.append((x0, y0, int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1))))
    boxes.append((0, 0, 1, 1))          # one pixel in a corner
    boxes.append((w - 2, h - 3, w, h))  # xmax == width, ymax == height (as in the real file)
    expected = np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            if any(x0 <= x < x1 and y0 <= y < y1 for x0, y0, x1, y1 in boxes):
                expected[y, x] = 255
    np.testing.assert_array_equal(box_mask(h, w, boxes), expected)
    prior = box_prior(expected)
    assert set(np.unique(prior)) == {np.float32(0), np.float32(BOX_PRIOR)}


GOOD = {"height": 10, "width": 12, "bbox": [{"label": "polyp", "xmin": 1, "ymin": 2, "xmax": 12, "ymax": 10}]}


@pytest.mark.parametrize("entry, message", [
    ({**GOOD, "bbox": [{**GOOD["bbox"][0], "xmax": 13}]}, r"x 1\.\.13, y 2\.\.10 is empty or outside the 10x12"),
    ({**GOOD, "bbox": [{**GOOD["bbox"][0], "ymin": 10}]}, "is empty or outside"),
    ({**GOOD, "bbox": [{**GOOD["bbox"][0], "xmin": -1}]}, "is empty or outside"),
    ({**GOOD, "bbox": [{**GOOD["bbox"][0], "xmin": 1.5}]}, "'xmin' is 1.5, expected an integer"),
    ({**GOOD, "bbox": [{"label": "polyp", "xmin": 1, "ymin": 2, "xmax": 4}]}, "'ymax' is None"),
    ({**GOOD, "bbox": []}, "at least one box"),
    ({"height": 10, "width": 12}, "at least one box"),
    ({**GOOD, "height": "10"}, "'height' is '10'"),
])
def test_bad_boxes_are_errors_naming_file_and_id(tmp_path, entry, message):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"ok": GOOD, "bad one": entry}))
    with pytest.raises(DataError, match=message) as e:
        read_boxes(path)
    assert f"{path}: id 'bad one'" in str(e.value)


def test_unreadable_boxes_file(tmp_path):
    path = tmp_path / "boxes.json"
    path.write_text('{"a": {"height": 1,')
    with pytest.raises(DataError, match=f"cannot read boxes file {path}"):
        read_boxes(path)
    with pytest.raises(DataError, match="boxes file not found"):
        read_boxes(tmp_path / "none.json")


def test_box_maps_are_the_filled_boxes(tmp_path):
    src, root, boxes = prepared(tmp_path)
    assert make_box_maps(root, src / "boxes.json", SPEC) == {"ids": 3, "box": 3, "box_crf": 0}
    assert not (root / "gaze" / "box_crf").exists()
    dice_by_hand = []
    for i, e in boxes.items():
        saved = read_gray(root / "gaze" / "box" / f"{i}.jpg")
        b = e["bbox"][0]
        inside = np.zeros((e["height"], e["width"]), bool)
        inside[b["ymin"]:b["ymax"], b["xmin"]:b["xmax"]] = True
        np.testing.assert_array_equal(saved > 0.5, inside)  # JPEG ringing stays far from 0.5
        gt = read_gray(root / "masks" / f"{i}.jpg")
        dice_by_hand.append(2 * (gt * inside).sum() / (inside.sum() + gt.sum()))
    report = map_dice_report(root, SPEC)
    assert list(report) == ["box"] and report["box"][2] == 3
    assert report["box"][0] == pytest.approx(np.mean(dice_by_hand), abs=1e-6)
    assert 0.5 < report["box"][0] < 0.95  # an ellipse fills about pi/4 of its box


def test_box_crf_maps(tmp_path):
    src, root, boxes = prepared(tmp_path)
    make_box_maps(root, src / "boxes.json", SPEC, crf=True)
    report = map_dice_report(root, SPEC)
    for i, e in boxes.items():
        image = load_crf_image(root / "images" / f"{i}.jpg")
        box = box_mask(e["height"], e["width"], [tuple(e["bbox"][0][k] for k in ("xmin", "ymin", "xmax", "ymax"))])
        refined = crf_mod.refine(image, box_prior(box), "pydensecrf", "cpu", **SPEC.crf)
        stored = np.asarray(Image.open(root / "gaze" / "box_crf" / f"{i}.jpg").convert("L"), np.float32)
        assert np.abs(stored - to_uint8(refined)).mean() < 2  # what the CRF gives, stored as a JPEG like gaze maps
        assert not ((stored > 127.5) & (box == 0)).any()  # the map never grows past the box
        # a prior of 1 inside cannot be overruled by the bilateral term (see boxes.py): the box comes back
        hard = crf_mod.refine(image, box_prior(box, 1.0), "pydensecrf", "cpu", **SPEC.crf)
        np.testing.assert_array_equal(hard > 0.5, box > 0)
    # on these ellipses the CRF carves the box corners off along the colour edges
    assert report["box_crf"][0] > report["box"][0] + 0.05


def test_boxes_and_images_must_agree(tmp_path):
    src, root, boxes = prepared(tmp_path)
    path = tmp_path / "b.json"
    for change, message in [
        (lambda b: b.pop("p1"), f"no boxes for image {root / 'images' / 'p1.jpg'}"),
        (lambda b: b.update(extra=GOOD), "id 'extra' has boxes but no image"),
        (lambda b: b["p2"].update(width=b["p2"]["width"] + 1), f"id 'p2': {path} says 48x57 .* is 48x56"),
    ]:
        edited = json.loads(json.dumps(boxes))
        change(edited)
        path.write_text(json.dumps(edited))
        with pytest.raises(DataError, match=message):
            make_box_maps(root, path, SPEC)


def test_prepare_cli_writes_box_maps_and_reports_dice(tmp_path, capsys):
    src = tmp_path / "src"
    make_source(src, 4)
    out = tmp_path / "out"
    base = ["kvasir", "--src", str(src), "--out", str(out), "--test-size", "1", "--workers", "2"]  # a CRF pool
    assert prepare_main(base + ["--boxes", str(src / "boxes.json"), "--box-crf"]) == 0
    printed = capsys.readouterr().out
    assert "4 box map(s)" in printed and "4 box+CRF map(s)" in printed
    assert "Dice of box > 0.5 vs the masks over 4 images" in printed
    assert "Dice of box_crf > 0.5 vs the masks over 4 images" in printed
    assert len(list((out / "gaze" / "box_crf").glob("*.jpg"))) == 4
    assert prepare_main(base + ["--box-crf"]) == 2
    assert capsys.readouterr().err.strip() == "error: --box-crf needs --boxes kavsir_bboxes.json"
    assert prepare_main(base + ["--boxes", str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: boxes file not found: {tmp_path / 'none.json'}"


def test_real_kvasir_boxes(kvasir_dir, tmp_path):
    """A few real images: the box maps are the boxes of kavsir_bboxes.json, at the images' sizes."""
    every = json.loads((kvasir_dir / "kavsir_bboxes.json").read_text())
    ids = sorted(every)[:3]
    root = tmp_path / "root"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
        for i in ids:
            (root / sub / f"{i}.jpg").symlink_to(kvasir_dir / sub / f"{i}.jpg")
    (tmp_path / "b.json").write_text(json.dumps({i: every[i] for i in ids}))
    make_box_maps(root, tmp_path / "b.json", SPEC)
    for i in ids:
        e = every[i]
        saved = read_gray(root / "gaze" / "box" / f"{i}.jpg")
        assert saved.shape == read_gray(root / "masks" / f"{i}.jpg").shape == (e["height"], e["width"])
        boxes = [tuple(b[k] for k in ("xmin", "ymin", "xmax", "ymax")) for b in e["bbox"]]
        np.testing.assert_array_equal(saved > 0.5, box_mask(e["height"], e["width"], boxes) > 0)


def test_prepare_checks_the_boxes_before_writing_anything(tmp_path, capsys):
    """A boxes file that disagrees with the images (a wrong size) is refused before images, masks and split
    files are written: OUT stays as it was."""
    src = tmp_path / "src"
    make_source(src, 3)
    boxes = json.loads((src / "boxes.json").read_text())
    first = sorted(boxes)[0]
    boxes[first]["width"] += 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(boxes))
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    argv = ["kvasir", "--src", str(src), "--out", str(out), "--test-size", "1", "--workers", "1", "--boxes", str(bad)]
    assert prepare_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"id '{first}': {bad} says" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
