"""Command-line flags. Names and defaults are the paper's, so its scripts run unchanged; a YAML file given
with --config (keys = flag names) sets defaults that explicit flags still override."""
import argparse
from typing import List, Optional

import yaml

METHOD_ALIASES = {"gaze": "gaze_sup", "gaze_sup": "gaze_sup", "full": "full_sup", "full_sup": "full_sup"}


def _int_list(text: str) -> List[int]:
    return [int(v) for v in str(text).replace(" ", "").strip("[]()").split(",") if v]


def _float_list(text: str) -> List[float]:
    return [float(v) for v in str(text).replace(" ", "").strip("[]()").split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="GazeSup: train and evaluate gaze-supervised segmentation (Zhong et al., MICCAI 2024).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--config", default=None, help="YAML file whose keys are flag names; explicit flags override it")
    g.add_argument("-m", "--method", default="gaze_sup", choices=sorted(METHOD_ALIASES),
                   help="gaze_sup: train on gaze pseudo-masks; full_sup: train on ground-truth masks (gaze, full: aliases)")
    g.add_argument("--data", default="kvasir", help="dataset: kvasir or prostate")
    g.add_argument("--root", default=None, help="prepared dataset folder (images/, masks/, gaze/, train.txt, test.txt)")
    g.add_argument("--exp_path", default="exp", help="runs go to EXP/<seed>/<data>/<run_id>_<timestamp>/")
    g.add_argument("--ckpt_path", default=None, help="checkpoint (.pth, or a run folder meaning its model_best.pth) "
                   "for --test, --resume or predict")
    g.add_argument("--resume", action="store_true", help="continue the run of --ckpt_path (iteration, optimizer, schedule)")
    g.add_argument("--test", action="store_true", help="only evaluate --ckpt_path on the test split")
    g.add_argument("--save_pred", action="store_true", help="write test predictions (PNG) of the ensemble and each level")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--device", default="0", help="CUDA device index; CPU is used when no GPU is visible")
    g.add_argument("--num_worker", type=int, default=4, help="data loading workers")
    g.add_argument("--demo", action="store_true", help="generate a small synthetic dataset with simulated gaze and "
                   "train a narrow model on it (CPU, a few minutes)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--run_name", default=None, help="run folder name prefix (default: method and levels)")

    g = p.add_argument_group("data")
    g.add_argument("--spatial_size", type=int, default=384, help="network input side; images are resized to it")
    g.add_argument("--in_channels", type=int, default=3, help="image channels (kvasir 3, prostate 1)")
    g.add_argument("--data_size_rate", type=float, default=1.0, help="use the first int(n*rate) training ids")
    g.add_argument("--train_split", default="train", help="training split file (ROOT/<name>.txt)")
    g.add_argument("--test_split", default="test", help="test split file (ROOT/<name>.txt)")
    g.add_argument("--gaze_dir", default="crf_compat1", help="gaze-map folder under ROOT/gaze/")
    g.add_argument("--thresholds", type=_float_list, default=None,
                   help="gaze-map threshold per level, e.g. 0.5,0.3 (default: the paper's table)")
    g.add_argument("--val_fraction", type=float, default=0.0,
                   help="hold out this seeded fraction of the training ids (with their GT masks) to select "
                        "model_best; 0 selects on the test split as the paper does")
    g.add_argument("--preload", default="auto", choices=["auto", "yes", "no"],
                   help="decode and resize the training set once and keep it as tensors (auto: yes)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="unet", choices=["unet"], help="network (the paper's MONAI BasicUNet)")
    g.add_argument("--num_levels", type=int, default=2, help="number of gaze levels (networks)")
    g.add_argument("--features", type=_int_list, default=[64, 128, 256, 512, 1024, 128],
                   help="U-Net widths (6 values); narrow ones for CPU")
    g.add_argument("--feat_dim", type=int, default=128, help="feature-map channels (U-Net output)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--opt", default="adam", choices=["sgd", "adam"], help="sgd: momentum 0.99, Nesterov")
    g.add_argument("--lr", type=float, default=4e-4, help="learning rate")
    g.add_argument("--lr_min", type=float, default=1e-6, help="final learning rate of the cosine schedule")
    g.add_argument("--lr_scheduler", default="none", choices=["none", "cos"], help="per-epoch learning-rate schedule")
    g.add_argument("--weight_decay", type=float, default=4e-4, help="weight decay")
    g.add_argument("--max_ite", type=int, default=15000, help="training iterations")
    g.add_argument("--warmup_ite", type=int, default=0, help="warm-up length, compared with the epoch as in the paper's code")
    g.add_argument("-bs", "--batch_size", type=int, default=8, help="batch size (per process)")
    g.add_argument("--cons_weight", type=float, default=3.0, help="weight of the cross-level consistency loss")
    g.add_argument("--cons_mode", default="prop", choices=["pure", "prop"], help="consistency on propagated or plain predictions")
    g.add_argument("--fp16", action="store_true", help="float16 autocast with a gradient scaler (same as --amp fp16)")
    g.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"], help="autocast precision")
    g.add_argument("--channels_last", action="store_true", help="channels_last memory format (faster convs on GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (static shapes)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-identical CPU reruns)")

    g = p.add_argument_group("logging")
    g.add_argument("--log_step", type=int, default=100, help="log every N iterations")
    g.add_argument("--val_step", type=int, default=1000, help="evaluate every N iterations (and after the last)")
    g.add_argument("--save_step", type=int, default=5000, help="save model_ite<N>.pth every N iterations")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        with open(pre.config) as f:
            config = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            parser.error(f"{pre.config}: unknown keys {unknown}")
        parser.set_defaults(**config)
    args = parser.parse_args(argv)
    args.method = METHOD_ALIASES[args.method]
    if args.fp16:
        args.amp = "fp16"
    for name in ("features", "thresholds"):  # YAML lists arrive as lists, strings from flags
        value = getattr(args, name)
        if isinstance(value, str):
            setattr(args, name, (_int_list if name == "features" else _float_list)(value))
    if len(args.features) != 6:
        parser.error(f"--features needs 6 values, got {args.features}")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    return args
