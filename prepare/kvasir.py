"""Kvasir-SEG -> the prepared layout ROOT/{images,masks}/<id>.jpg + ROOT/train.txt + ROOT/test.txt.

The source is an extracted Kvasir-SEG download (SRC/images/<id>.jpg, SRC/masks/<id>.jpg). Files are
symlinked (or copied) unchanged; the split comes from split files (the official MediaEval 2020 lists
train.txt / val.txt, val becoming test) or from a seeded random split.
"""
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from datasets.io import DataError, decoded_size, read_ids, split_line_numbers
from prepare.util import fail_listing, make_out_dir, write_list


def _sizes(paths: list, workers: int) -> list:
    """decoded_size of each path (DataError or (H, W)), decoded in threads (Pillow releases the GIL)."""
    def one(p):
        try:
            return decoded_size(p)
        except DataError as e:
            return e
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, paths))


def scan_kvasir(src, workers: int = 0) -> list:
    """Sorted ids of SRC/images/*.jpg, after checking each has a mask SRC/masks/<id>.jpg of the same size.

    Every image and mask is decoded in full, so a truncated or corrupt file fails here, not in training.

    Args:
        src: extracted Kvasir-SEG folder containing images/ and masks/.
        workers: decoding threads (0: one per CPU).
    """
    src = Path(src)
    image_dir, mask_dir = src / "images", src / "masks"
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"folder not found: {d} (expected an extracted Kvasir-SEG with images/ and masks/)")
    images = {p.stem: p for p in image_dir.glob("*.jpg")}
    masks = {p.stem: p for p in mask_dir.glob("*.jpg")}
    if not images:
        raise DataError(f"no .jpg images in {image_dir}")
    problems = [f"missing mask for image {images[i]}: expected {mask_dir / (i + '.jpg')}"
                for i in sorted(images.keys() - masks.keys())]
    problems += [f"mask {masks[i]} has no image: expected {image_dir / (i + '.jpg')}"
                 for i in sorted(masks.keys() - images.keys())]
    problems += [f"image file name {images[i].name!r} has whitespace at an end or a line break: its id cannot "
                 f"be written to a split file" for i in sorted(images) if i != i.strip() or "\n" in i or "\r" in i]
    both = sorted(images.keys() & masks.keys())
    sizes = _sizes([images[i] for i in both] + [masks[i] for i in both], workers or os.cpu_count() or 1)
    problems += [str(e) for e in sizes if isinstance(e, DataError)]
    for i, si, sm in zip(both, sizes[:len(both)], sizes[len(both):], strict=True):
        if isinstance(si, DataError) or isinstance(sm, DataError):
            continue
        if si != sm:
            problems.append(f"size mismatch for {i}: image {images[i]} is {si[0]}x{si[1]} (HxW), "
                            f"mask {masks[i]} is {sm[0]}x{sm[1]}")
    fail_listing(problems, "problem(s) in the Kvasir-SEG source")
    return sorted(images)


def _read_split_file(path: Path, known: set) -> list:
    """Ids of a split file (datasets.io.read_ids: whole lines), each checked against the known image ids."""
    ids = read_ids(path)
    lines = split_line_numbers(path)
    fail_listing([f"{path}:{lines[i]}: id '{i}' has no image" for i in ids if i not in known],
                 f"bad id(s) in split file {path}")
    return ids


def split_from_dir(split_dir, ids: list) -> tuple:
    """(train, test) from SPLIT_DIR/train.txt and SPLIT_DIR/val.txt (or test.txt); val becomes test.

    Args:
        split_dir: folder with the split files.
        ids: the available image ids; every split id must be one of them.
    """
    split_dir = Path(split_dir)
    train_file = split_dir / "train.txt"
    test_file = next((f for f in (split_dir / "val.txt", split_dir / "test.txt") if f.is_file()), None)
    if not train_file.is_file() or test_file is None:
        raise DataError(f"split folder {split_dir} needs train.txt and val.txt (or test.txt)")
    known = set(ids)
    train, test = _read_split_file(train_file, known), _read_split_file(test_file, known)
    both = sorted(set(train) & set(test))
    if both:
        raise DataError(f"{len(both)} id(s) in both {train_file} and {test_file}, e.g. '{both[0]}'")
    return train, test


def random_split(ids: list, test_size: int, seed: int) -> tuple:
    """(train, test): a seeded shuffle of the sorted ids, the first TEST_SIZE become test."""
    if not 0 < test_size < len(ids):
        raise DataError(f"--test-size {test_size} must be between 1 and {len(ids) - 1} ({len(ids)} images)")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    return sorted(order[test_size:]), sorted(order[:test_size])


def _place(src: Path, dst: Path, copy: bool) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()  # re-running replaces earlier links/copies
    if copy:
        shutil.copyfile(src, dst)
    else:
        dst.symlink_to(src.resolve())


def prepare_kvasir(src, out, split_dir=None, test_size=None, seed: int = 0, copy: bool = False,
                   workers: int = 0) -> dict:
    """Link/copy Kvasir-SEG into OUT and write OUT/train.txt, OUT/test.txt. Returns the counts.

    Args:
        src: extracted Kvasir-SEG (images/, masks/).
        out: the prepared root to write.
        split_dir: folder with train.txt + val.txt; if None a random split of TEST_SIZE images is made.
        test_size: number of test images of the random split.
        seed: seed of the random split.
        copy: copy the files instead of symlinking them.
        workers: decoding threads of the source check (0: one per CPU).
    """
    if (split_dir is None) == (test_size is None):
        raise DataError("give either a split folder (--split-dir) or a random split size (--test-size)")
    src, out = Path(src), Path(out)
    make_out_dir(out, check_only=True)  # a bad --out fails before the long source check
    ids = scan_kvasir(src, workers)
    train, test = split_from_dir(split_dir, ids) if split_dir is not None else random_split(ids, test_size, seed)
    for sub in ("images", "masks"):
        make_out_dir(out / sub)
        for i in ids:
            _place(src / sub / f"{i}.jpg", out / sub / f"{i}.jpg", copy)
    write_list(out / "train.txt", train)
    write_list(out / "test.txt", test)
    return {"ids": len(ids), "train": len(train), "test": len(test), "unused": len(ids) - len(train) - len(test)}
