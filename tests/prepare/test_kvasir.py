"""python -m prepare kvasir: synthetic Kvasir-SEG folders and the real download."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.io import DataError, read_gray, read_ids, read_image
from prepare.cli import main
from prepare.kvasir import prepare_kvasir, random_split, scan_kvasir

SIZES = {f"id{i:02d}": (30 + 7 * i, 20 + 3 * i) for i in range(10)}  # (width, height), all different


def make_kvasir(root: Path, sizes=SIZES, mask_sizes=None) -> Path:
    """SRC/images/<id>.jpg (RGB) and SRC/masks/<id>.jpg (a white box), like the Kvasir-SEG download."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        mw, mh = (mask_sizes or {}).get(i, (w, h))
        mask = np.zeros((mh, mw, 3), np.uint8)
        mask[mh // 4: mh // 2, mw // 4: mw // 2] = 255
        Image.fromarray(mask).save(root / "masks" / f"{i}.jpg")
    return root


def write_split(folder: Path, train, val) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("\n".join(train) + "\n")
    (folder / "val.txt").write_text("\n".join(val) + "\n")
    return folder


def test_split_dir_links_everything(tmp_path):
    src = make_kvasir(tmp_path / "src")
    ids = sorted(SIZES)
    split = write_split(tmp_path / "splits", ids[3:], ids[:3])
    counts = prepare_kvasir(src, tmp_path / "out", split_dir=split)
    assert counts == {"ids": 10, "train": 7, "test": 3, "unused": 0}
    assert read_ids(tmp_path / "out" / "train.txt") == ids[3:]
    assert read_ids(tmp_path / "out" / "test.txt") == ids[:3]
    for i in ids:
        for sub in ("images", "masks"):
            link = tmp_path / "out" / sub / f"{i}.jpg"
            assert link.is_symlink() and link.resolve() == (src / sub / f"{i}.jpg").resolve()
        image = read_image(tmp_path / "out" / "images" / f"{i}.jpg")
        mask = read_gray(tmp_path / "out" / "masks" / f"{i}.jpg")
        assert image.shape[:2] == mask.shape == SIZES[i][::-1]
    # running again replaces the links instead of failing on existing files
    assert prepare_kvasir(src, tmp_path / "out", split_dir=split)["ids"] == 10


def test_copy_makes_regular_files(tmp_path):
    src = make_kvasir(tmp_path / "src")
    prepare_kvasir(src, tmp_path / "out", test_size=2, seed=0, copy=True)
    for i in SIZES:
        copied = tmp_path / "out" / "masks" / f"{i}.jpg"
        assert not copied.is_symlink() and copied.read_bytes() == (src / "masks" / f"{i}.jpg").read_bytes()


def test_random_split_is_seeded_disjoint_and_complete():
    ids = [f"x{i}" for i in range(50)]
    train, test = random_split(ids, 12, seed=3)
    assert len(test) == 12 and sorted(train + test) == sorted(ids) and not set(train) & set(test)
    assert random_split(list(reversed(ids)), 12, seed=3) == (train, test)  # input order does not matter
    assert any(random_split(ids, 12, seed=s)[1] != test for s in (4, 5, 6))
    with pytest.raises(DataError, match="--test-size 50"):
        random_split(ids, 50, seed=0)


def test_missing_mask_is_named(tmp_path):
    src = make_kvasir(tmp_path / "src")
    (src / "masks" / "id04.jpg").unlink()
    with pytest.raises(DataError, match=r"missing mask for image .*images/id04\.jpg: expected .*masks/id04\.jpg"):
        scan_kvasir(src)


def test_mask_without_image_is_named(tmp_path):
    src = make_kvasir(tmp_path / "src")
    (src / "images" / "id07.jpg").unlink()
    with pytest.raises(DataError, match=r"mask .*masks/id07\.jpg has no image"):
        scan_kvasir(src)


def test_size_mismatch_is_named_with_both_sizes(tmp_path):
    src = make_kvasir(tmp_path / "src", mask_sizes={"id02": (45, 26)})
    w, h = SIZES["id02"]
    expected = rf"size mismatch for id02: image .*id02\.jpg is {h}x{w} \(HxW\), mask .*id02\.jpg is 26x45"
    with pytest.raises(DataError, match=expected):
        scan_kvasir(src)


def test_split_id_without_image_names_file_and_line(tmp_path):
    src = make_kvasir(tmp_path / "src")
    split = write_split(tmp_path / "splits", ["id00", "id01", "nope"], ["id02"])
    with pytest.raises(DataError, match=r"splits/train\.txt:3: id 'nope' has no image"):
        prepare_kvasir(src, tmp_path / "out", split_dir=split)


def test_id_in_both_splits_raises(tmp_path):
    src = make_kvasir(tmp_path / "src")
    split = write_split(tmp_path / "splits", ["id00", "id01"], ["id01"])
    with pytest.raises(DataError, match="1 id\\(s\\) in both .*train.txt and .*val.txt, e.g. 'id01'"):
        prepare_kvasir(src, tmp_path / "out", split_dir=split)


def test_cli(tmp_path, capsys):
    src = make_kvasir(tmp_path / "src")
    split = write_split(tmp_path / "splits", sorted(SIZES)[:6], sorted(SIZES)[6:8])
    assert main(["kvasir", "--src", str(src), "--out", str(tmp_path / "out"), "--split-dir", str(split)]) == 0
    printed = capsys.readouterr()
    assert "10 ids checked" in printed.out and "6 train, 2 test" in printed.out
    assert "2 image(s) are in neither split file" in printed.err
    assert main(["kvasir", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--test-size", "2"]) == 2
    assert "folder not found" in capsys.readouterr().err
    # argparse: a split is required; a usage error is one line too
    assert main(["kvasir", "--src", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "one of the arguments --split-dir --test-size is required" in capsys.readouterr().err


@pytest.mark.slow
def test_real_kvasir_official_split(kvasir_dir, tmp_path):
    counts = prepare_kvasir(kvasir_dir, tmp_path, split_dir=kvasir_dir / "splits")
    assert counts == {"ids": 1000, "train": 880, "test": 120, "unused": 0}
    train, test = read_ids(tmp_path / "train.txt"), read_ids(tmp_path / "test.txt")
    assert train == read_ids(kvasir_dir / "splits" / "train.txt")
    assert test == read_ids(kvasir_dir / "splits" / "val.txt")
    links = sorted((tmp_path / "images").iterdir())
    assert len(links) == 1000 and all(p.is_symlink() and p.resolve().is_file() for p in links)
    assert {p.stem for p in links} == set(train) | set(test)
