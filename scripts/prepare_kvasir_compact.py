"""Build the compact copy of a prepared dataset that a short GPU session carries: training images with their gaze
maps, test images with their masks (real files, copied: links would not travel), and the two split files.

    python -m prepare kvasir --src Kvasir-SEG --out data/kvasir --split-dir SPLITS
    python -m gaze --csv kvasir_fixation.csv --root data/kvasir --data kvasir
    python scripts/prepare_kvasir_compact.py --root data/kvasir --out .data/kvasir [--gaze_dir crf_compat1]

Why not `python -m prepare kvasir --copy`: that copies every image and every mask (55 MiB for Kvasir-SEG), and `python
-m gaze` adds its heatmap and CRF folders beside them: over the 64 MiB a device session carries. The compact copy
holds only what training and testing read: 44.5 MiB for Kvasir-SEG with one gaze folder (measured with the box
maps). Nothing here may be committed: .data/ is git-ignored.
"""
import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.dataspec import load_spec  # noqa: E402  (after the path insert: run as a script)
from common.errors import OneLineParser, run_cli  # noqa: E402
from datasets.io import DataError, read_ids  # noqa: E402
from prepare.util import make_out_dir, write_list  # noqa: E402


def plan(root: Path, gaze_dirs: list, data: str, train_split: str = "train", test_split: str = "test") -> tuple:
    """(train ids, test ids, [(source, destination relative to OUT)]); every source checked to exist."""
    spec = load_spec(data)
    train, test = read_ids(root / f"{train_split}.txt"), read_ids(root / f"{test_split}.txt")
    files = [f"images/{i}{spec.image_ext}" for i in train + test] + [f"masks/{i}{spec.mask_ext}" for i in test]
    files += [f"gaze/{d}/{i}{spec.gaze_ext}" for d in gaze_dirs for i in train]
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        hint = " (make gaze maps with: python -m gaze --csv FIXATIONS.csv --root ROOT)" if "gaze/" in missing[0] else ""
        raise DataError(f"{len(missing)} file(s) missing under --root {root}, e.g. {root / missing[0]}{hint}")
    return train, test, [(root / f, Path(f)) for f in files]


def build(root, out, gaze_dirs=("crf_compat1",), data: str = "kvasir") -> dict:
    """Copy what training and testing read from the prepared ROOT to OUT; returns counts and the size in bytes."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise DataError(f"--root {root} is not a folder (prepare it with: python -m prepare kvasir ...)")
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise DataError(f"--out {out} is inside --root {root}; choose a separate folder")
    make_out_dir(out, check_only=True)
    train, test, files = plan(root, list(gaze_dirs), data)
    for src, rel in files:
        make_out_dir((out / rel).parent)
        shutil.copyfile(src, out / rel)  # follows the prepared root's symlinks to the real files
    write_list(out / "train.txt", train)
    write_list(out / "test.txt", test)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"train": len(train), "test": len(test), "files": len(files), "bytes": size}


def _main(argv=None) -> int:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="prepared root (python -m prepare + python -m gaze --root ROOT)")
    p.add_argument("--out", required=True, help="compact copy to write")
    p.add_argument("--gaze_dir", nargs="+", default=["crf_compat1"],
                   help="folder(s) under ROOT/gaze to carry (default crf_compat1; e.g. box box_crf)")
    p.add_argument("--data", default="kvasir", help="dataset spec, name or file (default kvasir)")
    args = p.parse_args(argv)
    c = build(args.root, args.out, args.gaze_dir, args.data)
    print(f"{args.out}: {c['train']} train, {c['test']} test, {c['files']} files, {c['bytes'] / 2 ** 20:.1f} MiB")
    return 0


def main(argv=None) -> int:
    """The CLI; a user error prints one line `error: ...` and returns 2."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
