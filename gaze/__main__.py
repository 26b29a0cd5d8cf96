"""python -m gaze --csv FIXATIONS.csv --root ROOT --data {kvasir,prostate} [options]: see gaze.pipeline."""
import argparse
import sys

from datasets.io import DataError, read_ids
from gaze.fixations import FixationError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gaze", description="Fixation CSV -> gaze heatmaps -> "
                                "dense-CRF gaze maps -> Dice report (GazeMedSeg recipe).")
    p.add_argument("--csv", required=True, help="GazeMedSeg fixation CSV")
    p.add_argument("--root", required=True, help="dataset root with images/ and masks/ (only read)")
    p.add_argument("--data", required=True, choices=["kvasir", "prostate"])
    p.add_argument("--out", default=None, help="output folder (default ROOT/gaze)")
    p.add_argument("--steps", default="heatmap,crf", help="comma-separated subset of heatmap,crf")
    p.add_argument("--crf-backend", default="pydensecrf", choices=["pydensecrf", "torch"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (torch backend)")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = all cores, 1 = no pool)")
    p.add_argument("--overwrite", action="store_true", help="recompute existing maps")
    p.add_argument("--ids", default=None, help="file with one image id per line: only these images")
    p.add_argument("--crf-batch", type=int, default=16, help="images per batch for the torch backend")
    p.add_argument("--no-report", action="store_true", help="skip the Dice report")
    p.add_argument("--no-sheet", action="store_true", help="skip the PNG sheet")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)

    from gaze.pipeline import make_gaze_maps  # after argparse, so --help is instant
    try:
        make_gaze_maps(a.csv, a.root, a.data, out_dir=a.out, steps=[s.strip() for s in a.steps.split(",") if s.strip()],
                       crf_backend=a.crf_backend, device=a.device, workers=a.workers, overwrite=a.overwrite,
                       report=not a.no_report, sheet=not a.no_sheet, quiet=a.quiet,
                       ids=read_ids(a.ids) if a.ids else None, crf_batch=a.crf_batch)
    except (FixationError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
