r"""Prepare the datasets from their official downloads: one command per dataset.

    python -m datasets.prepare kvasir --src Kvasir-SEG --out data/kvasir --split-dir SPLITS
    python -m datasets.prepare kvasir --src Kvasir-SEG --out data/kvasir --test-size 120 --seed 0
    python -m datasets.prepare nci-isbi --dicom "NCI-ISBI 2013 prostate" --labels LABELS \
        [--test-labels LEADERBOARD TEST] --out data/prostate
    python -m datasets.prepare nci-isbi --labels LABELS --masks-only --out data/prostate

Both write OUT/images/, OUT/masks/, OUT/train.txt and OUT/test.txt (see prepare_kvasir.py and
prepare_nci_isbi.py for the details).
"""
import argparse
import sys

from datasets.io import DataError
from datasets.prepare_kvasir import prepare_kvasir
from datasets.prepare_nci_isbi import prepare_nci_isbi, warn


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datasets.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", required=True)

    k = sub.add_parser("kvasir", help="Kvasir-SEG: link/copy images and masks, write the split")
    k.add_argument("--src", required=True, help="extracted Kvasir-SEG folder (images/, masks/)")
    k.add_argument("--out", required=True, help="prepared root to write")
    split = k.add_mutually_exclusive_group(required=True)
    split.add_argument("--split-dir", help="folder with train.txt and val.txt (val becomes test.txt)")
    split.add_argument("--test-size", type=int, help="random split: number of test images")
    k.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    k.add_argument("--copy", action="store_true", help="copy the files instead of symlinking them")

    n = sub.add_parser("nci-isbi", help="NCI-ISBI 2013: DICOM slices + masks of the labelled slices")
    n.add_argument("--labels", nargs="+", required=True, help="folder(s) of training NRRD label volumes")
    n.add_argument("--test-labels", nargs="+", default=[], help="folder(s) of test NRRD label volumes")
    n.add_argument("--dicom", help="top folder of the TCIA DICOM download")
    n.add_argument("--out", required=True, help="prepared root to write")
    n.add_argument("--masks-only", action="store_true", help="no DICOMs: write only masks and lists")
    n.add_argument("--exclude", nargs="+", default=[], help="case names to leave out")
    n.add_argument("--seed", type=int, default=0, help="seed of the train.txt shuffle (default 0)")
    n.add_argument("--ignore-geometry", action="store_true",
                   help="keep cases whose slices fail the geometry check (still reported)")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.dataset == "kvasir":
            c = prepare_kvasir(args.src, args.out, args.split_dir, args.test_size, args.seed, args.copy)
            if c["unused"]:
                warn(f"{c['unused']} image(s) are in neither split file")
            print(f"kvasir: {c['ids']} ids checked (image and mask of equal size), "
                  f"{c['train']} train, {c['test']} test -> {args.out} ({'copies' if args.copy else 'symlinks'})")
        else:
            r = prepare_nci_isbi(args.labels, args.out, args.dicom, args.test_labels, args.masks_only,
                                 args.exclude, args.seed, args.ignore_geometry)
            if r["unreadable"]:
                print(f"nci-isbi: {r['unreadable']} file(s) under {args.dicom} are not DICOM, ignored")
            for case, reason in r["skipped"].items():
                print(f"nci-isbi: skipped {case}: {reason}")
            print(f"nci-isbi: {len(r['geometry'])} geometry mismatch(es)" if not args.masks_only else
                  "nci-isbi: masks only (no DICOMs, no slice-count or geometry check)")
            print(f"nci-isbi: {len(r['train']) + len(r['test'])} slices, {len(r['train'])} train, "
                  f"{len(r['test'])} test, {len(r['skipped'])} case(s) skipped -> {args.out}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
