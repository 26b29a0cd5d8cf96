r"""Prepare the datasets from their official downloads: one command per dataset.

    python -m prepare kvasir --src Kvasir-SEG --out data/kvasir --split-dir SPLITS
    python -m prepare kvasir --src Kvasir-SEG --out data/kvasir --test-size 120 --seed 0
    python -m prepare kvasir --src Kvasir-SEG --out data/kvasir --split-dir SPLITS \
        --boxes Kvasir-SEG/kavsir_bboxes.json [--box-crf]
    python -m prepare nci-isbi --dicom "NCI-ISBI 2013 prostate" --labels LABELS \
        [--test-labels LEADERBOARD TEST] --out data/prostate
    python -m prepare nci-isbi --labels LABELS --masks-only --out data/prostate
    python -m prepare sparse --root data/kvasir --kind points|scribbles [--seed N]

Both write OUT/images/, OUT/masks/, OUT/train.txt and OUT/test.txt (see kvasir.py and
nci_isbi.py for the details). With --boxes, kvasir also writes box pseudo-masks as gaze maps
OUT/gaze/box/ (and OUT/gaze/box_crf/ with --box-crf; see boxes.py) and prints their Dice against the masks.
`sparse` simulates point or scribble labels from a prepared root's masks (see sparse_labels.py).
"""
import argparse
import os
import sys
from pathlib import Path

from common.dataspec import load_spec
from common.errors import OneLineParser, command_name, run_cli
from datasets.io import DataError
from prepare.boxes import BOX_CRF_DIR, BOX_DIR, check_box_file, make_box_maps, map_dice_report
from prepare.kvasir import prepare_kvasir
from prepare.nci_isbi import prepare_nci_isbi
from prepare.sparse_labels import add_arguments as add_sparse_arguments
from prepare.sparse_labels import run as run_sparse
from prepare.util import warn


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=command_name("python -m prepare"), description=__doc__,
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
    k.add_argument("--boxes", help="Kvasir-SEG's kavsir_bboxes.json: write filled-box maps to OUT/gaze/box/")
    k.add_argument("--box-crf", action="store_true",
                   help="with --boxes: also write the boxes refined by the dense CRF to OUT/gaze/box_crf/")
    k.add_argument("--data", default="kvasir", help="dataset spec (name or file) of the box maps' format and CRF")
    k.add_argument("--workers", type=int, default=0,
                   help="processes/threads for decoding and the box CRF (default 0: one per CPU)")

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

    s = sub.add_parser("sparse", help="simulated points or scribbles from the masks of a prepared root "
                       "(ROOT/labels/<kind>/, for -m sparse_sup)")
    add_sparse_arguments(s)
    return parser


def _kvasir(args) -> None:
    if args.box_crf and not args.boxes:
        raise DataError("--box-crf needs --boxes kavsir_bboxes.json")
    spec = load_spec(args.data) if args.boxes else None  # a bad spec fails before the long source check
    if args.boxes:  # check first, write after: a bad boxes file leaves OUT as it was
        check_box_file(args.boxes, Path(args.src) / "images", spec, args.box_crf)
    c = prepare_kvasir(args.src, args.out, args.split_dir, args.test_size, args.seed, args.copy, args.workers)
    if c["unused"]:
        warn(f"{c['unused']} image(s) are in neither split file")
    print(f"kvasir: {c['ids']} ids checked (image and mask decoded, of equal size), "
          f"{c['train']} train, {c['test']} test -> {args.out} ({'copies' if args.copy else 'symlinks'})")
    if args.boxes:
        b = make_box_maps(args.out, args.boxes, spec, args.box_crf, args.workers or os.cpu_count() or 1)
        print(f"kvasir: {b['box']} box map(s) -> {Path(args.out) / 'gaze' / BOX_DIR}"
              + (f", {b['box_crf']} box+CRF map(s) -> {Path(args.out) / 'gaze' / BOX_CRF_DIR}" if args.box_crf else ""))
        for d, (soft, binary, n) in map_dice_report(args.out, spec).items():
            print(f"kvasir: Dice of {d} > 0.5 vs the masks over {n} images: {100 * soft:.2f} % (GT = mask/255), "
                  f"{100 * binary:.2f} % (GT binarised)")


def _nci_isbi(args) -> None:
    r = prepare_nci_isbi(args.labels, args.out, args.dicom, args.test_labels, args.masks_only,
                         args.exclude, args.seed, args.ignore_geometry)
    if r["unreadable"]:
        print(f"nci-isbi: {r['unreadable']} file(s) under {args.dicom} are not DICOM, ignored")
    for case, reasons in r["kept_despite"].items():
        more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
        warn(f"{case}: kept (--ignore-geometry) although {reasons[0]}{more}")
    for case, reason in r["skipped"].items():  # each skipped case reported once, here
        print(f"nci-isbi: skipped {case}: {reason}")
    print(f"nci-isbi: {len(r['geometry'])} geometry mismatch(es)" if not args.masks_only else
          "nci-isbi: masks only (no DICOMs, no slice-count or geometry check)")
    print(f"nci-isbi: {len(r['train']) + len(r['test'])} slices, {len(r['train'])} train, "
          f"{len(r['test'])} test, {len(r['skipped'])} case(s) skipped -> {args.out}")


def _main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.dataset == "sparse":
        return run_sparse(args)
    _kvasir(args) if args.dataset == "kvasir" else _nci_isbi(args)
    return 0


def main(argv=None) -> int:
    """The CLI; a user error prints one line `error: ...` and returns 2."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
