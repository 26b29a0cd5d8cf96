"""python -m gaze --csv FIXATIONS.csv --root ROOT --data NAME_OR_SPEC [options]: see gaze.pipeline.
python -m gaze simulate --root ROOT --out FIXATIONS.csv [options]: simulated fixations, see gaze.simulate.

Every error a user can cause (bad CSV, missing folder, bad option) exits with status 2 and one line
`error: ...` on stderr; a traceback means a bug in the project.
"""
import argparse
import sys

from common.errors import OneLineParser, command_name, run_cli


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=command_name("python -m gaze"), description="Fixation CSV -> gaze heatmaps -> "
                                "dense-CRF gaze maps -> Dice report (GazeMedSeg recipe). "
                                "`python -m gaze simulate --help`: simulated fixations from masks.")
    p.add_argument("--csv", required=True, help="fixation CSV (GazeMedSeg columns, or any CSV with --columns)")
    p.add_argument("--root", required=True, help="dataset root with images/ (and masks/ for the report); only read")
    p.add_argument("--data", required=True, help="built-in dataset (kvasir, prostate) or a dataset spec YAML")
    p.add_argument("--out", default=None, help="output folder (default ROOT/gaze)")
    p.add_argument("--steps", default=None, help="comma-separated subset of heatmap,crf (default: both, or "
                   "heatmap alone when the spec has crf: null)")
    p.add_argument("--columns", default=None, metavar="ROLE=COLUMN,...",
                   help="read a generic fixation CSV: roles image, x, y, and duration or start+end; optional "
                   "width+height (else read from the image) and index (duplicate check). Default: GazeMedSeg")
    p.add_argument("--coords", default="normalized", choices=["normalized", "pixels"],
                   help="x, y in [0, 1] (default) or in pixels of the original image (x / width, y / height)")
    p.add_argument("--outside", default="error", choices=["error", "drop"],
                   help="a fixation outside the image: error (default) or drop it (counted in the report)")
    p.add_argument("--crf-backend", default="pydensecrf", choices=["pydensecrf", "torch"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (torch backend)")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = all cores, 1 = no pool)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute every map (default: only missing maps and maps whose inputs changed)")
    p.add_argument("--ids", default=None, help="file with one image id per line: only these images")
    p.add_argument("--crf-batch", type=int, default=16, help="images per batch for the torch backend")
    p.add_argument("--no-report", action="store_true", help="skip the Dice report")
    p.add_argument("--no-sheet", action="store_true", help="skip the PNG sheet")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    """The command; a UserError becomes `error: ...` and exit status 2 (common.errors.run_cli)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["simulate"]:
        from gaze.simulate import main as simulate_main
        return simulate_main(argv[1:])
    return run_cli(_main, argv)


def _main(argv=None) -> int:
    a = parser().parse_args(argv)
    # imported after argparse, so that --help is instant
    from datasets.io import read_ids
    from gaze.fixations import parse_columns
    from gaze.pipeline import make_gaze_maps

    steps = [s.strip() for s in a.steps.split(",") if s.strip()] if a.steps is not None else None
    make_gaze_maps(a.csv, a.root, a.data, out_dir=a.out, steps=steps, crf_backend=a.crf_backend, device=a.device,
                   workers=a.workers, overwrite=a.overwrite, report=not a.no_report, sheet=not a.no_sheet,
                   quiet=a.quiet, ids=read_ids(a.ids) if a.ids else None, crf_batch=a.crf_batch,
                   columns=parse_columns(a.columns) if a.columns else None, coords=a.coords, outside=a.outside)
    return 0


if __name__ == "__main__":
    sys.exit(main())
