"""python -m gaze on bad input (exit 2, one line naming the file, user's files intact), the manifest of
what each map was made from, generic fixation CSVs (pixels, start/end, sizes from the images), `crf: null`
specs, the stored value of CRF maps, and a torch-free gaze stage. All on tiny synthetic data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gaze.__main__ import main
from gaze.fixations import FixationError, parse_columns, read_fixations
from gaze.heatmap import gaze_heatmap, to_uint8
from gaze.pipeline import crf_to_uint8, make_gaze_maps
from tests.gaze.test_pipeline import HAVE_CRF, HEADER, SIZES, make_root
from tests.helpers import one_error_line

REPO = Path(__file__).resolve().parents[2]
needs_crf = pytest.mark.skipif(not HAVE_CRF, reason="pydensecrf2 is not installed (pip install pydensecrf2==1.1)")
ROW = "img_{k}.jpg,{i},0.25,0.5,300,40.0,60.0"


def small_csv(tmp_path, n: int = 8, name: str = "fix.csv") -> Path:
    lines = [HEADER] + [ROW.format(k=i // 3, i=i % 3 + 1) for i in range(n)]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def error_of(capsys) -> str:
    return one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- reading the CSV

@pytest.mark.parametrize("n", [8, 3000])  # 3000 rows: a stray quote would swallow > 131072 characters
def test_stray_quote_is_reported_at_its_own_line(tmp_path, n):
    path = small_csv(tmp_path, n)
    lines = path.read_text().splitlines()
    lines[5] = lines[5].replace("0.25", '"0.25')  # line 6 of the file
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(FixationError) as e:
        read_fixations(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:6: unbalanced '\"'") and len(msg) < 200, msg


def test_quote_inside_an_unquoted_field_is_a_bad_value_on_its_line(tmp_path):
    path = small_csv(tmp_path)
    path.write_text(path.read_text().replace("0.25", '0.2"5', 1))
    with pytest.raises(FixationError, match=rf"{path}:2: column CURRENT_FIX_X value '0.2\"5' is not a number"):
        read_fixations(path)


def test_line_without_newline_is_bounded(tmp_path):
    path = tmp_path / "one_line.csv"
    path.write_text(HEADER + "\n" + "x" * 300_000)  # the 200 MB case, smaller: reading stops at 65537 characters
    with pytest.raises(FixationError) as e:
        read_fixations(path)
    assert str(e.value).startswith(f"{path}:2: line longer than 65536 characters") and len(str(e.value)) < 200


@pytest.mark.parametrize("content,match", [
    (bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "not UTF-8 text"),
    ((HEADER + "\n" + ROW.format(k=0, i=1) + "\n").encode("utf-16"), "UTF-16 text"),
    ((HEADER + "\n" + ROW.format(k=0, i=1) + "\n").encode("utf-16-le"), "NUL byte"),
])
def test_undecodable_files_name_the_file_and_the_encoding(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(FixationError, match=match) as e:
        read_fixations(path)
    assert str(path) in str(e.value) and "UTF-8" in str(e.value)


def test_duplicated_fixation_names_both_lines(tmp_path):
    path = small_csv(tmp_path)
    lines = path.read_text().splitlines()
    lines.insert(5, lines[2])  # line 3 repeated as line 6
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(FixationError, match=rf"{path}:6: image img_0 fixation CURRENT_FIX_INDEX 2 is already on "
                                            r"line 3"):
        read_fixations(path)


@pytest.mark.parametrize("text,match", [("image=a,x=b", "missing role"), ("image=a,x=b,y=c", "duration"),
                                        ("image=a,x=b,y=c,duration=d,start=e,end=f", "either"),
                                        ("image=a,x=b,y=c,start=e", "both start"),
                                        ("image=a,x=b,y=c,duration=d,width=w", "together"),
                                        ("image=a,x=b,y=c,duration=d,colour=q", "unknown role 'colour'"),
                                        ("image=a,x=b,x=c,duration=d", "twice"), ("image", "ROLE=COLUMN")])
def test_bad_column_maps(text, match):
    with pytest.raises(FixationError, match=match):
        parse_columns(text)


# ----------------------------------------------------------------------------- the command on bad input

def cli(root, csv, out, *extra):
    return main(["--csv", str(csv), "--root", str(root), "--data", "kvasir", "--out", str(out), "--workers", "1",
                 "--steps", "heatmap", "--no-sheet", "--quiet", *extra])


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    root, csv, _ = make_root(tmp_path, "kvasir", seed=10)
    out = tmp_path / "out"
    assert cli(tmp_path / "nope", csv, out) == 2
    assert f"--root {tmp_path / 'nope'}: no such directory" in error_of(capsys) and not out.exists()

    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert cli(root, csv, afile) == 2
    assert f"--out {afile}: exists and is not a directory" in error_of(capsys)
    assert afile.read_text() == "mine"

    quoted = tmp_path / "quoted.csv"
    lines = csv.read_text().splitlines()
    lines[5] = lines[5].replace(",", ',"', 1)
    quoted.write_text("\n".join(lines) + "\n")
    assert cli(root, quoted, out) == 2
    assert f"{quoted}:6: unbalanced" in error_of(capsys)

    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes(csv.read_text().encode("utf-16"))
    assert cli(root, utf16, out) == 2
    assert f"{utf16}: UTF-16" in error_of(capsys)

    assert cli(root, csv, out, "--columns", "image=IMAGE,x=CURRENT_FIX_X") == 2
    assert "--columns" in error_of(capsys)
    assert cli(root, csv, out, "--steps", "blur") == 2
    assert "--steps" in error_of(capsys)
    assert not (out / "heatmap").exists() or not any((out / "heatmap").iterdir())


@pytest.mark.slow
def test_cli_subprocess_exit_status_and_no_torch(tmp_path):
    """Through `python -m gaze`: status 2 and one line; a full heatmap + CRF run never imports torch."""
    root, csv, _ = make_root(tmp_path, "kvasir", seed=11)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "gaze", "--csv", str(csv), "--root", str(tmp_path / "absent"),
                        "--data", "kvasir"], cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: --root"), r.stderr
    steps = "heatmap,crf" if HAVE_CRF else "heatmap"
    code = ("import sys; from gaze.__main__ import main; "
            f"rc = main(['--csv', {str(csv)!r}, '--root', {str(root)!r}, '--data', 'kvasir', '--out', "
            f"{str(tmp_path / 'o')!r}, '--workers', '1', '--steps', {steps!r}, '--quiet']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "o" / "heatmap").iterdir())) == 3


# ----------------------------------------------------------------------------- the manifest

def test_rerun_recomputes_exactly_the_changed_maps(tmp_path):
    root, csv, fix = make_root(tmp_path, "prostate", seed=12)
    out = tmp_path / "o"
    run = dict(out_dir=out, steps=["heatmap"], workers=1, quiet=True, sheet=False)
    res = make_gaze_maps(csv, root, "prostate", **run)
    assert res["written"] == {"heatmap": 3} and res["changed"] == {"heatmap": 0}
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["heatmap"]) == sorted(SIZES)
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "heatmap").iterdir()}

    res = make_gaze_maps(csv, root, "prostate", **run)
    assert res["written"] == {"heatmap": 0} and res["skipped"] == {"heatmap": 3}

    # the corrected CSV changes img_b only: exactly its map is recomputed, and now equals the new fixations
    lines = csv.read_text().splitlines()
    k = next(i for i, line in enumerate(lines) if line.startswith("img_b.jpg"))
    parts = lines[k].split(",")
    parts[4] = str(int(parts[4]) + 500)
    lines[k] = ",".join(parts)
    csv.write_text("\n".join(lines) + "\n")
    res = make_gaze_maps(csv, root, "prostate", **run)
    assert res["written"] == {"heatmap": 1} and res["changed"] == {"heatmap": 1} and res["skipped"] == {"heatmap": 2}
    now = {p.name: p.stat().st_mtime_ns for p in (out / "heatmap").iterdir()}
    assert [n for n in now if now[n] != stamp[n]] == ["img_b.png"]
    f = fix["img_b"].copy()
    f[0, 2] += 500
    h, w = SIZES["img_b"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "heatmap" / "img_b.png")),
                                  to_uint8(gaze_heatmap(f, h, w, 50.0)))

    # another sigma (a spec given as a path) changes every heatmap
    spec = tmp_path / "prostate_s40.yaml"
    spec.write_text((REPO / "configs/data/prostate.yaml").read_text().replace("sigma: 50", "sigma: 40"))
    assert "sigma: 40" in spec.read_text()
    res = make_gaze_maps(csv, root, str(spec), **run)
    assert res["written"] == {"heatmap": 3} and res["changed"] == {"heatmap": 3}

    res = make_gaze_maps(csv, root, str(spec), overwrite=True, **run)
    assert res["written"] == {"heatmap": 3}

    (out / "manifest.json").write_text("{not json")
    res = make_gaze_maps(csv, root, str(spec), **run)
    assert res["written"] == {"heatmap": 3} and "manifest.json: ignored" in res["notes"][0]


@needs_crf
def test_crf_map_depends_on_its_heatmap_and_image(tmp_path):
    root, csv, _ = make_root(tmp_path, "kvasir", seed=13)
    run = dict(out_dir=tmp_path / "o", workers=1, quiet=True, sheet=False)
    make_gaze_maps(csv, root, "kvasir", **run)
    img = root / "images" / "img_c.jpg"
    Image.fromarray(np.asarray(Image.open(img))[::-1].copy()).save(img)  # the image changed, not the fixations
    res = make_gaze_maps(csv, root, "kvasir", **run)
    assert res["written"] == {"heatmap": 0, "crf": 1} and res["changed"] == {"heatmap": 0, "crf": 1}
    (tmp_path / "o" / "heatmap" / "img_a.jpg").unlink()  # rewritten with the same bytes: its CRF map stays
    res = make_gaze_maps(csv, root, "kvasir", **run)
    assert res["written"] == {"heatmap": 1, "crf": 0}
    lines = csv.read_text().splitlines()  # new fixations for img_a: its heatmap, then its CRF map, change
    k = next(i for i, line in enumerate(lines) if line.startswith("img_a.jpg"))
    parts = lines[k].split(",")
    parts[2] = "0.5"
    lines[k] = ",".join(parts)
    csv.write_text("\n".join(lines) + "\n")
    res = make_gaze_maps(csv, root, "kvasir", **run)
    assert res["written"] == {"heatmap": 1, "crf": 1} and res["changed"] == {"heatmap": 1, "crf": 1}


# ----------------------------------------------------------------------------- generic CSVs and specs

SPEC = """name: grayparts
image_ext: .png
mask_ext: .png
gaze_ext: .png
in_channels: 1
normalization: per_image_zscore
heatmap: {canvas: 768, sigma: 50}
crf: null
thresholds: {1: [0.5], 2: [0.5, 0.3]}
"""


def generic_root(tmp_path, fix: dict, masks: bool = False):
    """Gray PNG images of SIZES, a spec with crf: null, and a REFLACX-style CSV (pixels, start/end, no sizes)."""
    root = tmp_path / "gray"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["dicom_id,fix_no,x_position,y_position,timestamp_start_fixation,timestamp_end_fixation,extra"]
    for iid, (h, w) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(root / "images" / f"{iid}.png")
        if masks:
            (root / "masks").mkdir(exist_ok=True)
            Image.fromarray(np.zeros((h, w), np.uint8)).save(root / "masks" / f"{iid}.png")
        t = 10.0
        for k, (x, y, d) in enumerate(fix[iid]):
            rows.append(f"{iid},{k},{float(x * w)!r},{float(y * h)!r},{t!r},{t + float(d) / 1000!r},q")  # seconds
            t += 1.0
    spec = tmp_path / "gray.yaml"
    spec.write_text(SPEC)
    csv = tmp_path / "reflacx_style.csv"
    csv.write_text("\n".join(rows) + "\n")
    return root, spec, csv


COLUMNS = ("image=dicom_id,x=x_position,y=y_position,start=timestamp_start_fixation,end=timestamp_end_fixation,"
           "index=fix_no")


def test_generic_pixel_csv_gives_the_gazemedseg_heatmaps(tmp_path, capsys):
    # fixations on a 1/64 grid: x_px = x * w and x_px / w are exact, so both routes see the same numbers
    rng = np.random.default_rng(1)
    fix = {iid: np.c_[rng.integers(8, 56, (6, 2)) / 64, rng.integers(100, 900, 6)] for iid in SIZES}
    root, spec, csv = generic_root(tmp_path, fix)
    rc = main(["--csv", str(csv), "--root", str(root), "--data", str(spec), "--out", str(tmp_path / "o"),
               "--columns", COLUMNS, "--coords", "pixels", "--workers", "1", "--no-sheet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Dice report skipped: no masks" in printed  # the report needs masks; training from gaze does not
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["heatmap", "manifest.json", "report.json"]
    for iid, (h, w) in SIZES.items():
        saved = np.asarray(Image.open(tmp_path / "o" / "heatmap" / f"{iid}.png"))
        # durations from start/end in seconds: a constant factor, which the min-max normalisation removes
        np.testing.assert_array_equal(saved, to_uint8(gaze_heatmap(fix[iid], h, w, 50.0)))

    got = read_fixations(csv, parse_columns(COLUMNS), "pixels", image_size=lambda i: SIZES[i])
    for iid in SIZES:
        np.testing.assert_array_equal(got[iid].xs, fix[iid][:, 0])
        np.testing.assert_allclose(got[iid].durations, fix[iid][:, 2] / 1000, rtol=1e-12)

    assert main(["--csv", str(csv), "--root", str(root), "--data", str(spec), "--out", str(tmp_path / "o"),
                 "--columns", COLUMNS, "--coords", "pixels", "--steps", "heatmap,crf"]) == 2
    assert "crf is null" in error_of(capsys)


def test_pixels_outside_the_image_error_or_drop(tmp_path, capsys):
    fix = {iid: np.array([[0.5, 0.5, 300.0], [0.25, 0.75, 200.0]]) for iid in SIZES}
    root, spec, csv = generic_root(tmp_path, fix, masks=True)
    text = csv.read_text().splitlines()
    text[2] = text[2].replace("16.0,", "70.0,", 1)  # img_a is 64 wide: x = 70 px is outside
    assert "70.0," in text[2]
    csv.write_text("\n".join(text) + "\n")
    args = ["--csv", str(csv), "--root", str(root), "--data", str(spec), "--out", str(tmp_path / "o"),
            "--columns", COLUMNS, "--coords", "pixels", "--workers", "1", "--no-sheet", "--quiet"]
    assert main(args) == 2
    assert f"{csv}:3: x_position, y_position = 70.0" in error_of(capsys)
    res = make_gaze_maps(csv, root, str(spec), out_dir=tmp_path / "o", columns=parse_columns(COLUMNS),
                         coords="pixels", outside="drop", workers=1, quiet=True, sheet=False)
    assert res["dropped_fixations"] == 1 and res["written"] == {"heatmap": 3} and res["dice"]["heatmap"]["n"] == 3

    (root / "images" / "img_b.png").unlink()  # no size column and no image: the size cannot be known
    assert main(args + ["--outside", "drop"]) == 2
    assert "img_b.png: not found" in error_of(capsys)


def test_missing_pydensecrf_is_a_one_line_error_before_any_work(tmp_path, capsys, monkeypatch):
    for name in ("pydensecrf", "pydensecrf.densecrf"):  # as if pydensecrf2 were not installed
        monkeypatch.setitem(sys.modules, name, None)
    root, csv, _ = make_root(tmp_path, "kvasir", seed=14)
    assert cli(root, csv, tmp_path / "o", "--steps", "heatmap,crf") == 2
    assert "pip install pydensecrf2" in error_of(capsys) and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- stored values

def test_crf_maps_and_heatmaps_are_stored_as_the_notebooks_store_them():
    rng = np.random.default_rng(2)
    q = rng.random((64, 64), dtype=np.float32)  # a CRF marginal: float32
    crf_nb = (q * 255).astype(np.uint8)  # notebook: (crf_map * 255).astype(np.uint8)
    via_f16 = to_uint8(q)  # the heatmap's conversion (float16 first)
    assert (crf_nb != via_f16).mean() > 0.001  # the maps where the two conversions disagree
    np.testing.assert_array_equal(crf_to_uint8(q), crf_nb)
    h16 = q.astype(np.float16)  # draw_heatmap returns float16
    heat_nb = (h16.astype(np.float16) * 255).astype(np.uint8)
    assert (heat_nb != crf_nb).any()
    np.testing.assert_array_equal(to_uint8(h16), heat_nb)
    np.testing.assert_array_equal(to_uint8(q), heat_nb)  # the pipeline passes the float32 map before the cast
