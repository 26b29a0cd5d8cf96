"""Split files and prepared data: one reader (datasets.io.read_ids) for prepare, run.py and gaze; ids with spaces,
BOMs and duplicates; prepare decodes every file; prepare --out FILE. Synthetic data only."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import run
from datasets.io import DataError, read_ids
from prepare.cli import main as prepare_main
from tests.helpers import one_error_line, tiny_argv
from tests.prepare.test_kvasir import make_kvasir, write_split

SIZES = {"a": (40, 36), "polyp 01": (44, 40), "b": (36, 44), "c": (40, 40), "d": (48, 36), "e": (36, 36)}
TRAIN, TEST = ["a", "polyp 01", "b", "c"], ["d", "e"]





@pytest.mark.parametrize("text, expected", [
    ("a\nb\n", ["a", "b"]),
    ("polyp 01\n  b c  \n", ["polyp 01", "b c"]),          # whole lines, surrounding whitespace stripped
    ("\ufeffa\r\nb\r\n\r\n", ["a", "b"]),                   # BOM ignored, CRLF, blank lines skipped
    ("a\n\n\t\nb", ["a", "b"]),                             # no final newline
])
def test_read_ids_reads_whole_lines(tmp_path, text, expected):
    path = tmp_path / "train.txt"
    path.write_bytes(text.encode("utf-8"))
    assert read_ids(path) == expected


@pytest.mark.parametrize("data, message", [
    (b"a\nb\na\n", r"train.txt:3: id 'a' is listed twice \(first on line 1\)"),
    (b"a\n\xff\xfe\x00\n", "expected UTF-8 text"),
    (b"\n \n", "split file is empty"),
])
def test_read_ids_errors_name_the_file(tmp_path, data, message):
    path = tmp_path / "train.txt"
    path.write_bytes(data)
    with pytest.raises(DataError, match=message) as e:
        read_ids(path)
    assert str(path) in str(e.value)


def _prepared(tmp_path: Path, sizes=SIZES) -> Path:
    src = make_kvasir(tmp_path / "src", sizes)
    split = write_split(tmp_path / "splits", TRAIN, TEST)
    assert prepare_main(["kvasir", "--src", str(src), "--out", str(tmp_path / "out"), "--split-dir", str(split),
                         "--workers", "1"]) == 0
    return tmp_path / "out"


def _gaze_from_masks(root: Path) -> None:
    """Gaze maps: blurred masks (what the CRF maps look like, without the CRF)."""
    gaze = root / "gaze" / "crf_compat1"
    gaze.mkdir(parents=True)
    for path in sorted((root / "masks").glob("*.jpg")):
        mask = np.asarray(Image.open(path).convert("L"), np.float32) / 255
        blurred = ndimage.gaussian_filter(mask, 2)
        Image.fromarray(np.round(blurred / blurred.max() * 255).astype(np.uint8)).save(gaze / path.name)


def test_id_with_a_space_round_trips_prepare_to_training(tmp_path, capsys, one_thread):
    root = _prepared(tmp_path)
    assert "polyp 01\n" in (root / "train.txt").read_text()
    assert read_ids(root / "train.txt") == TRAIN
    _gaze_from_masks(root)
    argv = tiny_argv(root, tmp_path / "exp", "--max_ite", "1", "--val_step", "100", "--save_step", "100", "--quiet")
    assert run.main(argv) == 0


def test_duplicated_id_is_the_same_error_in_prepare_and_run(tmp_path, capsys, one_thread):
    root = _prepared(tmp_path)
    _gaze_from_masks(root)
    (tmp_path / "splits" / "train.txt").write_text("\n".join(TRAIN + ["polyp 01"]) + "\n")
    assert prepare_main(["kvasir", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out2"),
                         "--split-dir", str(tmp_path / "splits")]) == 2
    from_prepare = one_error_line(capsys.readouterr().err)
    (root / "train.txt").write_text("\n".join(TRAIN + ["polyp 01"]) + "\n")
    with pytest.raises(DataError) as e:  # run.py's __main__ turns it into `error: ...`, exit 2
        run.main(tiny_argv(root, tmp_path / "exp", "--max_ite", "1", "--quiet"))
    from_run = str(e.value)
    expected = "id 'polyp 01' is listed twice (first on line 2)"
    assert expected in from_prepare and expected in from_run
    assert "train.txt:5:" in from_prepare and "train.txt:5:" in from_run


def test_bom_in_a_split_file_is_ignored_by_run(tmp_path, capsys, one_thread):
    root = _prepared(tmp_path)
    _gaze_from_masks(root)
    (root / "train.txt").write_bytes("\ufeff".encode() + (root / "train.txt").read_bytes())
    argv = tiny_argv(root, tmp_path / "exp", "--max_ite", "1", "--val_step", "100", "--save_step", "100", "--quiet")
    assert run.main(argv) == 0


@pytest.mark.parametrize("which", ["images", "masks"])
def test_prepare_decodes_every_file(tmp_path, capsys, which):
    src = make_kvasir(tmp_path / "src", SIZES)
    broken = src / which / "c.jpg"
    data = broken.read_bytes()
    scan = data.index(b"\xff\xda")  # start of the entropy-coded pixels
    broken.write_bytes(data[: (scan + len(data)) // 2])  # the header (size) still reads; the pixels do not
    with Image.open(broken) as im:
        assert im.size == SIZES["c"]
    out = tmp_path / "out"
    assert prepare_main(["kvasir", "--src", str(src), "--out", str(out), "--test-size", "2", "--workers", "2"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot decode image {broken}" in line and "truncated" in line
    assert not (out / "train.txt").exists()  # nothing written for a source that fails its check


def test_prepare_out_is_a_file(tmp_path, capsys):
    src = make_kvasir(tmp_path / "src", SIZES)
    out = tmp_path / "out.txt"
    out.write_text("keep me\n")
    assert prepare_main(["kvasir", "--src", str(src), "--out", str(out), "--test-size", "2"]) == 2
    assert f"--out {out} is a file" in one_error_line(capsys.readouterr().err)
    assert out.read_text() == "keep me\n"
    assert prepare_main(["kvasir", "--src", str(src), "--out", str(out / "sub"), "--test-size", "2"]) == 2
    assert f"{out} is a file" in one_error_line(capsys.readouterr().err)


def test_prepare_rejects_ids_that_cannot_be_split_lines(tmp_path, capsys):
    src = make_kvasir(tmp_path / "src", {"a": (32, 32), "b ": (32, 32), "c": (32, 32)})
    assert prepare_main(["kvasir", "--src", str(src), "--out", str(tmp_path / "out"), "--test-size", "1"]) == 2
    assert "'b .jpg' has whitespace at an end" in one_error_line(capsys.readouterr().err)
