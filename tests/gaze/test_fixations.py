"""gaze.fixations: parsing the GazeMedSeg CSVs (both variants) and rejecting bad rows with file:line:value."""
import csv

import numpy as np
import pytest

from gaze.fixations import FixationError, read_fixations

HEADER = ("IMAGE,CURRENT_FIX_INDEX,CURRENT_FIX_X,CURRENT_FIX_Y,CURRENT_FIX_DURATION,CURRENT_FIX_PUPIL,"
          "CURRENT_FIX_START,IMAGE_HEIGHT,IMAGE_WIDTH")
ROWS = ["a.jpg,1,0.25,0.5,300,2000,7,40.0,60.0",
        "a.jpg,2,0.75,0.125,150,2000,300,40.0,60.0",
        "b.jpg,1,0.0,1.0,51,1800,7,30.0,20.0"]


def write(tmp_path, lines, name="fix.csv", newline="\n", bom=False):
    path = tmp_path / name
    path.write_bytes(((("\ufeff" if bom else "") + newline.join(lines) + newline)).encode("utf-8"))
    return path


@pytest.mark.parametrize("newline,bom,ints", [("\n", False, False), ("\r\n", True, True)])
def test_parse_variants(tmp_path, newline, bom, ints):
    rows = [r.replace(".0,", ",").replace(".0", "") if ints else r for r in ROWS]
    fix = read_fixations(write(tmp_path, [HEADER] + rows, newline=newline, bom=bom))
    assert list(fix) == ["a", "b"]
    a, b = fix["a"], fix["b"]
    np.testing.assert_array_equal(a.fixations, [[0.25, 0.5, 300], [0.75, 0.125, 150]])
    assert (a.height, a.width, b.height, b.width) == (40, 60, 30, 20)
    np.testing.assert_array_equal(a.lines, [2, 3])
    np.testing.assert_array_equal(b.lines, [4])
    assert isinstance(a.height, int) and a.fixations.dtype == np.float64


def test_blank_lines_are_skipped_and_line_numbers_stay_physical(tmp_path):
    fix = read_fixations(write(tmp_path, [HEADER, ROWS[0], "", ROWS[1], "", ""]))
    np.testing.assert_array_equal(fix["a"].lines, [2, 4])


BAD = [  # (description, lines, bad line number, text that must appear in the message)
    ("not a number", [HEADER, ROWS[0], ROWS[1].replace("0.75", "0.7x5")], 3, "0.7x5"),
    ("nan", [HEADER, ROWS[0].replace("0.25", "nan")], 2, "nan"),
    ("x > 1", [HEADER, ROWS[0], ROWS[1], ROWS[2].replace("0.0,1.0", "1.5,1.0")], 4, "1.5"),
    ("y < 0", [HEADER, ROWS[0].replace("0.5,300", "-0.01,300")], 2, "-0.01"),
    ("zero duration", [HEADER, ROWS[0], ROWS[1].replace(",150,", ",0,")], 3, "'0'"),
    ("negative duration", [HEADER, ROWS[0].replace(",300,", ",-5,")], 2, "-5"),
    ("fractional size", [HEADER, ROWS[0].replace("40.0,60.0", "40.5,60.0")], 2, "40.5"),
    ("inconsistent size", [HEADER, ROWS[0], ROWS[2], ROWS[1].replace("40.0,60.0", "41.0,60.0")], 4, "41"),
    ("wrong field count", [HEADER, ROWS[0], ROWS[1] + ",extra"], 3, "extra"),
    ("empty image", [HEADER, "," + ROWS[0].split(",", 1)[1]], 2, "IMAGE"),
]


@pytest.mark.parametrize("what,lines,line,value", BAD, ids=[b[0] for b in BAD])
def test_bad_rows_name_file_line_value(tmp_path, what, lines, line, value):
    path = write(tmp_path, lines)
    with pytest.raises(FixationError) as e:
        read_fixations(path)
    msg = str(e.value)
    assert f"{path}:{line}:" in msg and value in msg, msg


def test_missing_column_is_named(tmp_path):
    header = HEADER.replace("CURRENT_FIX_DURATION", "DURATION")
    path = write(tmp_path, [header] + ROWS)
    with pytest.raises(FixationError, match="CURRENT_FIX_DURATION") as e:
        read_fixations(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("lines,match", [([], "empty"), ([HEADER], "no fixation rows")])
def test_empty_files(tmp_path, lines, match):
    path = tmp_path / "e.csv"
    path.write_text("\n".join(lines))
    with pytest.raises(FixationError, match=match):
        read_fixations(path)


def test_missing_file(tmp_path):
    with pytest.raises(FixationError, match="not found"):
        read_fixations(tmp_path / "nope.csv")


def test_error_is_a_value_error():
    assert issubclass(FixationError, ValueError)


@pytest.mark.slow
def test_real_files_and_published_variant_agree(gazemedseg_dir):
    for main, sample in (("kvasir_fixation.csv", "kvasir_samples.csv"),
                         ("nci-isbi_fixation.csv", "nci-isbi_samples.csv")):
        check_real_file_and_its_published_variant(gazemedseg_dir, main, sample)


def check_real_file_and_its_published_variant(gazemedseg_dir, main: str, sample: str) -> None:
    full = read_fixations(gazemedseg_dir / main)
    with open(gazemedseg_dir / main, newline="") as f:  # independent count of data rows
        n_rows = sum(1 for r in csv.reader(f) if r) - 1
    assert sum(len(s.xs) for s in full.values()) == n_rows
    # every fixation's recorded line really is that row of the file
    lines = (gazemedseg_dir / main).read_text().splitlines()
    some = next(iter(full.values()))
    assert all(lines[n - 1].startswith(some.id + ".") for n in some.lines)

    part = read_fixations(gazemedseg_dir / "samples" / sample)  # CRLF, integer sizes, rounded values
    assert part and set(part) <= set(full)
    for iid, s in part.items():
        f = full[iid]
        assert (s.height, s.width) == (f.height, f.width)
        np.testing.assert_allclose(s.xs, f.xs, rtol=0, atol=5e-10)  # published with 9 decimals
        np.testing.assert_allclose(s.ys, f.ys, rtol=0, atol=5e-10)
        np.testing.assert_array_equal(s.durations, f.durations)
