"""`run.py --demo` (an entry point beside run.py): a synthetic polyp dataset with simulated gaze, its gaze maps,
and demo-sized flags."""
import importlib.util
from pathlib import Path

from common.errors import UserError

DEMO_FLAGS = {"method": "gaze_sup", "data": "kvasir", "in_channels": 3, "spatial_size": 64,
              "features": [8, 8, 16, 32, 64, 8], "feat_dim": 8, "num_levels": 2, "opt": "adam", "lr": 3e-3,
              "lr_min": 1e-5, "lr_scheduler": "cos", "batch_size": 8, "max_ite": 300, "log_step": 50,
              "val_step": 100, "save_step": 300, "num_worker": 0, "weight_decay": 1e-4}


def prepare_demo(args) -> None:
    """Generate the data under EXP/demo_data (once), make its gaze maps, and set the demo's flags on `args`
    (flags the user gave explicitly for the model size or schedule are overridden: the demo is a fixed recipe)."""
    from gaze.pipeline import make_gaze_maps
    from prepare.synthetic import make_synthetic_dataset

    root = Path(args.exp_path) / "demo_data"
    if not (root / "test.txt").is_file():
        try:
            csv_path = make_synthetic_dataset(root)
        except OSError as e:
            raise UserError(f"--exp_path {args.exp_path}: cannot write the demo data to {root} "
                            f"({e.strerror or e})") from None
    else:
        csv_path = root / "fixations.csv"
    backend = "pydensecrf" if importlib.util.find_spec("pydensecrf") else "torch"
    print(f"demo data: {root} (gaze maps with the {backend} CRF)")
    make_gaze_maps(csv_path, root, "kvasir", crf_backend=backend, workers=2, quiet=args.quiet)
    for key, value in DEMO_FLAGS.items():
        setattr(args, key, value)
    args.root = str(root)
