"""gaze.pipeline / python -m gaze on small synthetic roots (both layouts) and on a few real Kvasir images."""
import json

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from datasets.io import DataError, dicom_to_uint8_rgb, read_dicom, read_gray, read_ids
from gaze.__main__ import main
from gaze.crf import crf_refine_pydensecrf
from gaze.heatmap import gaze_heatmap, to_uint8
from gaze.pipeline import make_gaze_maps

try:
    import pydensecrf.densecrf  # noqa: F401
    HAVE_CRF = True
except ImportError:
    HAVE_CRF = False
# only the tests that run the CRF step need pydensecrf2; the heatmap-only ones run everywhere
needs_crf = pytest.mark.skipif(not HAVE_CRF, reason="pydensecrf2 is not installed (pip install pydensecrf2==1.1)")

HEADER = "IMAGE,CURRENT_FIX_INDEX,CURRENT_FIX_X,CURRENT_FIX_Y,CURRENT_FIX_DURATION,IMAGE_HEIGHT,IMAGE_WIDTH"
SIZES = {"img_a": (48, 64), "img_b": (56, 40), "img_c": (50, 50)}


def scene(rng, h: int, w: int):
    """A bright ellipse (the object) on a darker textured background, and fixations mostly inside it."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx, ry, rx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6), h * 0.25, w * 0.3
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    gray = np.where(inside, 180.0, 60.0) + rng.normal(0, 8, (h, w))
    k = int(rng.integers(5, 15))
    t = rng.uniform(0, 2 * np.pi, k)
    r = np.sqrt(rng.uniform(0, 0.8, k))
    xs, ys = (cx + r * rx * np.cos(t)) / w, (cy + r * ry * np.sin(t)) / h
    return gray, inside, np.c_[xs, ys, rng.integers(50, 1000, k)]


def write_dicom(path, pixels: np.ndarray) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def make_root(tmp_path, data: str, seed: int = 0):
    """ROOT with images/ and masks/ in the given layout, and a fixation CSV; returns (root, csv, fixations)."""
    rng = np.random.default_rng(seed)
    root = tmp_path / f"root_{data}"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines, fix = [HEADER], {}
    for iid, (h, w) in SIZES.items():
        gray, inside, f = scene(rng, h, w)
        fix[iid] = f
        for k, (x, y, d) in enumerate(f):
            lines.append(f"{iid}.jpg,{k + 1},{float(x)!r},{float(y)!r},{int(d)},{h}.0,{w}.0")
        if data == "kvasir":
            rgb = np.clip(np.stack([gray, gray * 0.7, gray * 0.5], -1), 0, 255).astype(np.uint8)
            Image.fromarray(rgb).save(root / "images" / f"{iid}.jpg")
            Image.fromarray(np.repeat(inside[..., None] * np.uint8(255), 3, -1)).save(root / "masks" / f"{iid}.jpg")
        else:
            write_dicom(root / "images" / f"{iid}.dcm", np.clip(gray * 7, 0, 4000))
            mask = inside.astype(np.uint8) * 255
            mask[binary_dilation(inside, iterations=3) & ~inside] = 100  # graded edge: soft and binary Dice differ
            Image.fromarray(mask).save(root / "masks" / f"{iid}.png")
    csv = tmp_path / f"{data}_fix.csv"
    csv.write_text("\n".join(lines) + "\n")
    return root, csv, fix


def dice(p, g):
    return 2 * float((p * g).sum()) / (float(p.sum()) + float(g.sum()) + 1e-6)


@needs_crf
def test_prostate_layout_exact_files_and_report(tmp_path):
    root, csv, fix = make_root(tmp_path, "prostate")
    out = tmp_path / "out"
    res = make_gaze_maps(csv, root, "prostate", out_dir=out, workers=1, quiet=True)
    assert res["written"] == {"heatmap": 3, "crf": 3} and res["skipped"] == {"heatmap": 0, "crf": 0}
    soft, hard = {"heatmap": [], "crf": []}, {"heatmap": [], "crf": []}
    for iid, (h, w) in SIZES.items():
        heat = np.asarray(Image.open(out / "heatmap" / f"{iid}.png"))
        np.testing.assert_array_equal(heat, to_uint8(gaze_heatmap(fix[iid], h, w, 50.0)))  # PNG: lossless, sigma 50
        image = dicom_to_uint8_rgb(read_dicom(root / "images" / f"{iid}.dcm"))
        crf = np.asarray(Image.open(out / "crf_compat1" / f"{iid}.png"))
        q = crf_refine_pydensecrf(image, heat.astype(np.float32) / 255)
        np.testing.assert_array_equal(crf, (q * 255).astype(np.uint8))  # the notebooks' expression, no float16
        g = np.asarray(Image.open(root / "masks" / f"{iid}.png")).astype(np.float64) / 255
        for name, m in (("heatmap", heat), ("crf", crf)):
            soft[name].append(dice(m / 255 > 0.5, g))
            hard[name].append(dice(m / 255 > 0.5, g > 0.5))
            # the report reads masks as float32: 1e-7
            assert res["per_image"][iid][name] == pytest.approx((soft[name][-1], hard[name][-1]), abs=1e-7)
    for name in ("heatmap", "crf"):
        assert res["dice"][name]["n"] == 3
        assert res["dice"][name]["soft_gt"] == pytest.approx(np.mean(soft[name]), abs=1e-7)
        assert res["dice"][name]["binary_gt"] == pytest.approx(np.mean(hard[name]), abs=1e-7)
    assert res["dice"]["heatmap"]["soft_gt"] > 0.3  # fixations lie on the object
    assert res["dice"]["heatmap"]["soft_gt"] != pytest.approx(res["dice"]["heatmap"]["binary_gt"], abs=1e-3)
    saved = json.loads((out / "report.json").read_text())
    assert saved["dice"] == res["dice"]
    sheet = np.asarray(Image.open(out / "report.png"))
    assert sheet.ndim == 3 and sheet.shape[0] >= 3 * 192


@needs_crf
def test_kvasir_layout_skips_existing_and_overwrites(tmp_path):
    root, csv, fix = make_root(tmp_path, "kvasir", seed=1)
    res = make_gaze_maps(csv, root, "kvasir", workers=1, quiet=True, sheet=False)  # default out: ROOT/gaze
    out = root / "gaze"
    files = sorted((out / "heatmap").glob("*.jpg")) + sorted((out / "crf_compat1").glob("*.jpg"))
    assert len(files) == 6 and res["written"] == {"heatmap": 3, "crf": 3}
    for iid, (h, w) in SIZES.items():  # JPEG is lossy: close to the exact map, sigma 70
        heat = read_gray(out / "heatmap" / f"{iid}.jpg") * 255
        assert np.abs(heat - to_uint8(gaze_heatmap(fix[iid], h, w, 70.0))).mean() < 2.0
    stamp = {f: f.stat().st_mtime_ns for f in files}

    res = make_gaze_maps(csv, root, "kvasir", workers=1, quiet=True, sheet=False)
    assert res["written"] == {"heatmap": 0, "crf": 0} and res["skipped"] == {"heatmap": 3, "crf": 3}
    assert {f: f.stat().st_mtime_ns for f in files} == stamp
    assert res["dice"]["crf"]["n"] == 3  # the report still covers existing maps

    (out / "crf_compat1" / "img_b.jpg").unlink()
    res = make_gaze_maps(csv, root, "kvasir", workers=1, quiet=True, sheet=False)
    assert res["written"] == {"heatmap": 0, "crf": 1}

    res = make_gaze_maps(csv, root, "kvasir", workers=1, quiet=True, sheet=False, overwrite=True)
    assert res["written"] == {"heatmap": 3, "crf": 3}
    assert not list(out.rglob(".*.tmp"))  # no leftovers of the atomic writes


@needs_crf
def test_missing_images_and_masks_are_reported_not_fatal(tmp_path):
    root, csv, _ = make_root(tmp_path, "kvasir", seed=2)
    (root / "images" / "img_a.jpg").unlink()
    (root / "masks" / "img_c.jpg").unlink()
    res = make_gaze_maps(csv, root, "kvasir", out_dir=tmp_path / "o", workers=1, quiet=True)
    assert res["missing_images"] == ["img_a"] and res["missing_masks"] == ["img_c"]
    assert res["written"] == {"heatmap": 3, "crf": 2}
    assert not (tmp_path / "o" / "crf_compat1" / "img_a.jpg").exists()
    assert res["dice"]["heatmap"]["n"] == 2 and res["dice"]["crf"]["n"] == 1  # img_b is the only one with both


def test_heatmap_step_needs_no_images(tmp_path):
    root, csv, _ = make_root(tmp_path, "prostate", seed=3)
    for p in (root / "images").iterdir():
        p.unlink()
    res = make_gaze_maps(csv, root, "prostate", out_dir=tmp_path / "o", steps=["heatmap"], workers=1, quiet=True)
    assert res["written"] == {"heatmap": 3} and res["dice"]["heatmap"]["n"] == 3 and "crf" not in res["dice"]


@needs_crf
@pytest.mark.slow
def test_pool_gives_the_same_files_as_serial(tmp_path):
    root, csv, _ = make_root(tmp_path, "prostate", seed=4)
    a = make_gaze_maps(csv, root, "prostate", out_dir=tmp_path / "a", workers=1, quiet=True, sheet=False)
    b = make_gaze_maps(csv, root, "prostate", out_dir=tmp_path / "b", workers=2, quiet=True, sheet=False)
    assert "pool_start" in b["time_s"] and a["dice"] == b["dice"]
    for sub in ("heatmap", "crf_compat1"):
        for f in (tmp_path / "a" / sub).iterdir():
            assert f.read_bytes() == (tmp_path / "b" / sub / f.name).read_bytes()


@needs_crf
def test_crf_alone_needs_heatmaps(tmp_path):
    root, csv, _ = make_root(tmp_path, "kvasir", seed=5)
    with pytest.raises(DataError, match="run the heatmap step first"):
        make_gaze_maps(csv, root, "kvasir", out_dir=tmp_path / "o", steps=["crf"], workers=1, quiet=True)


@needs_crf
@pytest.mark.parametrize("workers", [1, 2])  # 2: the error crosses the process pool
@pytest.mark.slow
def test_image_size_disagreeing_with_csv_names_the_file(tmp_path, workers):
    root, csv, _ = make_root(tmp_path, "kvasir", seed=6)
    bad = root / "images" / "img_b.jpg"
    Image.fromarray(np.zeros((57, 40, 3), np.uint8)).save(bad)
    with pytest.raises(DataError, match="img_b.jpg: the image is 57 x 40"):
        make_gaze_maps(csv, root, "kvasir", out_dir=tmp_path / "o", workers=workers, quiet=True)


def test_bad_arguments(tmp_path):
    root, csv, _ = make_root(tmp_path, "kvasir", seed=7)
    for kw, match in ((dict(data="ct"), "unknown --data"), (dict(steps=["blur"]), "steps"),
                      (dict(crf_backend="x"), "backend"), (dict(device="cuda", steps=["crf"]), "CPU only"),
                      (dict(ids=["img_a", "zzz"]), "zzz")):
        args = dict(csv_path=csv, root=root, data="kvasir", out_dir=tmp_path / "o", workers=1, quiet=True,
                    steps=["heatmap"]) | kw
        with pytest.raises(ValueError, match=match):
            make_gaze_maps(**args)


def test_cli(tmp_path, capsys):
    root, csv, _ = make_root(tmp_path, "prostate", seed=8)
    (tmp_path / "ids.txt").write_text("img_c\nimg_a\n")
    rc = main(["--csv", str(csv), "--root", str(root), "--data", "prostate", "--out", str(tmp_path / "o"),
               "--steps", "heatmap", "--workers", "1", "--ids", str(tmp_path / "ids.txt"), "--no-sheet"])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "o" / "heatmap").iterdir()) == ["img_a.png", "img_c.png"]
    assert "Dice" in capsys.readouterr().out
    broken = tmp_path / "broken.csv"
    broken.write_text(csv.read_text().replace(",1,", ",1,oops", 1))
    rc = main(["--csv", str(broken), "--root", str(root), "--data", "prostate", "--out", str(tmp_path / "o"),
               "--steps", "heatmap"])
    assert rc == 2 and f"{broken}:2:" in capsys.readouterr().err


@needs_crf
@pytest.mark.slow
def test_torch_backend_matches_pydensecrf_in_the_pipeline(tmp_path):
    pytest.importorskip("torch", reason="the torch CRF backend needs torch")  # not gaze.crf_torch: a broken
    # import of the project's own module must fail, not skip
    root, csv, _ = make_root(tmp_path, "prostate", seed=9)
    make_gaze_maps(csv, root, "prostate", out_dir=tmp_path / "a", workers=1, quiet=True, sheet=False)
    res = make_gaze_maps(csv, root, "prostate", out_dir=tmp_path / "b", steps=["heatmap", "crf"], crf_backend="torch",
                         workers=2, crf_batch=2, quiet=True, sheet=False)  # 2 batches: exercises the prefetch
    assert res["written"]["crf"] == 3
    for f in (tmp_path / "a" / "crf_compat1").iterdir():
        a = np.asarray(Image.open(f)).astype(int)
        b = np.asarray(Image.open(tmp_path / "b" / "crf_compat1" / f.name)).astype(int)
        assert np.abs(a - b).max() <= 1  # 1e-4 agreement can flip a truncation edge


@needs_crf
@pytest.mark.slow
def test_real_kvasir_few_images(kvasir_dir, gazemedseg_dir, tmp_path):
    ids = read_ids(kvasir_dir / "splits" / "val.txt")[:4]
    res = make_gaze_maps(gazemedseg_dir / "kvasir_fixation.csv", kvasir_dir, "kvasir", out_dir=tmp_path,
                         workers=1, quiet=True, ids=ids)
    assert res["written"] == {"heatmap": 4, "crf": 4} and not res["missing_images"] and not res["missing_masks"]
    for iid in ids:
        with Image.open(kvasir_dir / "images" / f"{iid}.jpg") as im:
            with Image.open(tmp_path / "crf_compat1" / f"{iid}.jpg") as c:
                assert im.size == c.size
    for name in ("heatmap", "crf"):
        d = res["dice"][name]
        assert d["n"] == 4 and 0.3 < d["soft_gt"] < 1 and abs(d["soft_gt"] - d["binary_gt"]) < 0.02
    assert (tmp_path / "report.png").is_file()
