"""python -m gaze refuses inputs that would give wrong maps without a word: normalised coordinates read as
pixels, a fixation file of another dataset; counts every dropped fixation; leaves no folder behind when it
refuses. Tiny synthetic data."""
import numpy as np

from gaze.__main__ import main
from gaze.pipeline import make_gaze_maps
from tests.gaze.test_cli_inputs import COLUMNS, generic_root
from tests.gaze.test_pipeline import SIZES, make_root
from tests.helpers import one_error_line as error_line


def one_error_line(capsys) -> str:
    return error_line(capsys.readouterr().err)


def test_normalised_coordinates_under_coords_pixels_are_an_error(tmp_path, capsys):
    fix = {iid: np.array([[0.5, 0.5, 300.0], [0.25, 0.75, 200.0]]) for iid in SIZES}
    root, spec, csv = generic_root(tmp_path, fix)
    lines = csv.read_text().splitlines()
    rows = [lines[0]]
    for line in lines[1:]:  # write the normalised values where pixels are expected
        f = line.split(",")
        h, w = SIZES[f[0]]
        f[2], f[3] = repr(float(f[2]) / w), repr(float(f[3]) / h)
        rows.append(",".join(f))
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "o"
    argv = ["--csv", str(csv), "--root", str(root), "--data", str(spec), "--out", str(out), "--columns", COLUMNS,
            "--coords", "pixels", "--workers", "1", "--no-sheet", "--quiet"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert f"{csv}:2: every x_position, y_position of image img_a lies within [0, 1]" in line
    assert "--coords normalized" in line and not out.exists()
    assert main(argv[:-6] + ["--coords", "normalized", "--workers", "1", "--no-sheet", "--quiet"]) == 0


def test_outside_drop_counts_the_fixations_of_an_image_left_without_any(tmp_path):
    fix = {iid: np.array([[0.5, 0.5, 300.0], [0.25, 0.75, 200.0]]) for iid in SIZES}
    root, spec, csv = generic_root(tmp_path, fix, masks=True)
    lines = csv.read_text().splitlines()
    for k in (1, 2):  # both fixations of img_a outside (x = 700 px of a 64 px wide image)
        f = lines[k].split(",")
        assert f[0] == "img_a"
        f[2] = "700.0"
        lines[k] = ",".join(f)
    f = lines[3].split(",")  # and one of img_b
    f[3] = "-5.0"
    lines[3] = ",".join(f)
    csv.write_text("\n".join(lines) + "\n")
    from gaze.fixations import parse_columns
    res = make_gaze_maps(csv, root, str(spec), out_dir=tmp_path / "o", columns=parse_columns(COLUMNS),
                         coords="pixels", outside="drop", workers=1, quiet=True, sheet=False)
    assert res["dropped_fixations"] == 3 and res["written"] == {"heatmap": 2}


def test_a_fixation_file_of_another_dataset_is_an_error(tmp_path, capsys):
    root, csv, _ = make_root(tmp_path, "kvasir", seed=3)
    other = tmp_path / "other.csv"
    other.write_text(csv.read_text().replace("img_", "Prostate3T-01-"))
    out = tmp_path / "out"
    argv = ["--csv", str(other), "--root", str(root), "--data", "kvasir", "--out", str(out), "--workers", "1",
            "--steps", "heatmap", "--no-sheet", "--quiet"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert f"{other}: 0 of 3 images found under {root / 'images'}" in line and not out.exists()
    half = tmp_path / "half.csv"  # one of three found: still refused
    half.write_text(csv.read_text().replace("img_b", "nope_b").replace("img_c", "nope_c"))
    argv[1] = str(half)
    assert main(argv) == 2
    assert "1 of 3 images found" in one_error_line(capsys) and not out.exists()


def test_refusals_leave_no_folder_and_name_the_problem(tmp_path, capsys):
    root, csv, _ = make_root(tmp_path, "kvasir", seed=4)
    out = tmp_path / "out"
    base = ["--root", str(root), "--data", "kvasir", "--out", str(out), "--workers", "1", "--no-sheet", "--quiet"]
    assert main(["--csv", str(csv), "--steps", "crf", "--crf-backend", "torch", *base]) == 2
    assert "heatmap(s) missing" in one_error_line(capsys) and not out.exists()
    assert main(["--csv", str(tmp_path), "--steps", "heatmap", *base]) == 2
    assert f"{tmp_path} is a folder; expected a fixation CSV file" in one_error_line(capsys)
    assert main(["--csv", str(csv), "--steps", "heatmap", "--columns",
                 "image=IMAGE,x=CURRENT_FIX_X,y=CURRENT_FIX_X,duration=CURRENT_FIX_DURATION", *base]) == 2
    assert "column 'CURRENT_FIX_X' is mapped to two roles, x and y" in one_error_line(capsys)
    assert not out.exists()
