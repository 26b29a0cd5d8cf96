"""`python run.py predict`: masks, probability maps and contour overlays for new images.

    python run.py predict --ckpt_path RUN/model_best.pth --input images/ --out pred/ [--save_prob]

Each input (jpg/png/dcm, or every such file in a folder) gives OUT/<stem>_mask.png (0/255, original size),
OUT/<stem>_overlay.png (prediction contour on the image; a DICOM slice min-max scaled) and, with
--save_prob, OUT/<stem>_prob.png (probability * 255). The image goes through the evaluation pipeline:
the dataset's normalisation, bilinear resize to --spatial_size, the model's "logits" (the level mean for
gaze_sup), bilinear upsampling to the original size, sigmoid > threshold.

Checkpoints: this project's (they record their flags in "args"; a run folder also has config.yaml) and the
paper's ({"state_dict", "opt", ...}, keys `model.<i>.encoder...` for gaze_sup, `encoder...` for full_sup).
The settings follow engine.restore's one rule (the same as --test and --resume): what the checkpoint
records wins, and a model-shape flag that differs from it is an error; for a paper checkpoint the method,
levels, widths and input channels are read from the weights, and --spatial_size is required.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from common.dataspec import builtin_specs, load_spec
from common.errors import OneLineParser, UserError, command_name, one_line, report_user_error
from datasets.io import DataError, read_image
from datasets.segmentation import data_spec, image_size, normalized_image, resize
from engine.device import pick_device
from engine.evaluate import model_outputs, upsample_logits
from engine.restore import Restored, restore, restored_model
from engine.run_folder import RunError
from engine.visualize import overlay, to_uint8_rgb
from parse_args import EVALUATION, PREDICT_SAFE, _int_list, flags_with

SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")


def builtin_data_for(channels: int) -> Optional[str]:
    """The first built-in dataset spec (by name) taking `channels`-channel images: the normalisation of a paper
    checkpoint, which records no dataset (3 channels -> kvasir, 1 -> prostate)."""
    return next((n for n in builtin_specs() if load_spec(n).in_channels == channels), None)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=command_name("run.py predict"), description="Segment new images with a trained checkpoint.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint .pth (or a run folder: its model_best.pth)")
    p.add_argument("--input", nargs="+", required=True, help="image files (jpg/png/dcm) and/or folders of them")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--spatial_size", type=int, default=None, help="network input side (default: from the checkpoint)")
    p.add_argument("--in_channels", type=int, default=None, help="image channels (default: from the checkpoint)")
    p.add_argument("--data", default=None,
                   help="dataset name or spec file, for the normalisation (default: the checkpoint's, else the "
                        "built-in dataset with the model's channel count: 3 -> kvasir, 1 -> prostate)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, or N (default: GPU 0 if visible, else cpu)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold of the mask (0 < t < 1)")
    p.add_argument("--save_prob", action="store_true", help="also write the probability map (0-255 PNG)")
    p.add_argument("--quiet", action="store_true", help="no line per image")
    g = p.add_argument_group("model shape, only for checkpoints that do not record it")
    g.add_argument("-m", "--method", default=None, choices=["gaze_sup", "full_sup"])
    g.add_argument("--num_levels", type=int, default=None)
    g.add_argument("--features", type=_int_list, default=None, help="6 comma-separated U-Net widths")
    g.add_argument("--feat_dim", type=int, default=None)
    return p


# ---------------------------------------------------------------- inputs
def _skip_reason(entry: Path) -> str:
    """Why a folder entry is not an input (for the skipped list)."""
    if entry.is_symlink() and not entry.exists():
        return "broken link"
    if entry.is_dir():
        return "folder"
    if not entry.is_file():
        return "not a regular file"
    return "not " + "/".join(s[1:] for s in SUFFIXES)


def list_inputs(inputs: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The images to predict and what was passed over.

    Args:
        inputs: files (jpg/jpeg/png/dcm) and folders; a folder gives its files with those suffixes (sorted,
            not recursive). Every image's header is read now, so a bad file fails before any work.
    Returns:
        (files, skipped): skipped lists each other entry of the named folders (other files, subfolders,
        broken links, ...) with the reason.
    Raises:
        DataError: an input that does not exist or has another suffix, a folder without images, two inputs
            with the same stem (their outputs would overwrite each other), an unreadable image header.
    """
    files, skipped = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = []
            for entry in sorted(path.iterdir()):
                if entry.is_file() and entry.suffix.lower() in SUFFIXES:
                    found.append(entry)
                else:
                    skipped.append((entry, _skip_reason(entry)))
            if not found:
                raise DataError(f"no {'/'.join(s[1:] for s in SUFFIXES)} files in folder {path}"
                                + (f" ({summarize_skipped(skipped)})" if skipped else ""))
            files += found
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise DataError(f"unsupported input {path}: expected one of {', '.join(SUFFIXES)}")
            files.append(path)
        elif path.is_symlink():
            raise DataError(f"input not found: {path} is a broken link (to {os.readlink(path)})")
        else:
            raise DataError(f"input not found: {path}")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems and stems[f.stem] != f:
            raise DataError(f"two inputs share the name {f.stem!r} ({stems[f.stem]} and {f}); their outputs "
                            "would overwrite each other")
        stems[f.stem] = f
        image_size(f)  # a header read: fails now, naming the file, rather than halfway through
    return list(dict.fromkeys(files)), skipped


def summarize_skipped(skipped: list[tuple[Path, str]], show: int = 5) -> str:
    """'skipped N entries: a.txt (not jpg/...), sub (folder), ... (+K more)'."""
    names = ", ".join(f"{p.name} ({why})" for p, why in skipped[:show])
    more = f", ... (+{len(skipped) - show} more)" if len(skipped) > show else ""
    return f"skipped {len(skipped)} {'entry' if len(skipped) == 1 else 'entries'}: {names}{more}"


def check_out_folder(out: Path) -> None:
    """--out must be a folder this process can write into, or a path where one can be created; checked before
    any work (nothing is created here).

    Raises:
        DataError: naming --out, what is in the way and why.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, expected a folder (new or existing) for the predictions")
    existing = out
    while not existing.exists():  # the nearest existing ancestor is where the folder would be created
        if existing.is_symlink():
            raise DataError(f"--out {out}: {existing} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"--out {out}: {existing} is a file, so no folder can be created under it")
    try:  # a real write: os.access misses read-only mounts for root and some network file systems
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".predict-write-test-"):
            pass
    except OSError as e:
        what = "cannot write into it" if existing == out else f"cannot create it in {existing}"
        raise DataError(f"--out {out}: {what} ({e.strerror or e})") from None


def check_threshold(threshold: float) -> None:
    """--threshold is a probability strictly between 0 and 1 (0 or 1 would give all-foreground or all-empty
    masks whatever the image)."""
    if not 0 < threshold < 1:  # also false for NaN
        raise DataError(f"--threshold is {threshold}, expected a probability strictly between 0 and 1")


# ---------------------------------------------------------------- checkpoint
# the flags of predict that restore() compares with (or, for a paper checkpoint, takes as) the record
MODEL_FLAGS = flags_with(EVALUATION) + flags_with(PREDICT_SAFE)


def resolve_config(args, ckpt_path) -> Restored:
    """The checkpoint and its settings by engine.restore's precedence rule: what the checkpoint records wins
    (a model-shape flag that differs from it is an error); a paper checkpoint takes the shape from its
    weights and needs --spatial_size; the normalisation defaults to the channel count's dataset."""
    explicit = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k, None) is not None}
    restored = restore(ckpt_path, explicit, "predict", {"method": "gaze_sup", "propagation": "torch"})
    cfg = restored.config
    missing = [k for k in ("in_channels", "features", "feat_dim") if cfg.get(k) is None]
    if missing:
        raise RunError(f"{restored.path}: the checkpoint does not record {missing} and they cannot be read from its "
                       f"weights; pass --{' --'.join(missing)}")
    if cfg.get("data") is None:
        cfg["data"] = builtin_data_for(cfg["in_channels"])
        if cfg["data"] is None:
            raise RunError(f"no normalisation known for {cfg['in_channels']}-channel images; pass --data")
    if data_spec(cfg["data"]).in_channels != cfg["in_channels"]:
        raise RunError(f"--data {cfg['data']} expects {data_spec(cfg['data']).in_channels}-channel images but the "
                       f"model takes {cfg['in_channels']} (from {restored.path})")
    return restored


def load_model(ckpt_path, args, device: torch.device):
    """(model in eval mode on `device`, resolved settings). Errors name the checkpoint."""
    restored = resolve_config(args, ckpt_path)
    for note in restored.notes:  # e.g. the spec file changed since the run: the recorded spec is used
        print(f"note: {note}")
    return restored_model(restored).to(device).eval(), restored.config


# ---------------------------------------------------------------- one image
def prepare(image: np.ndarray, data: str, spatial_size: int, path: Path) -> torch.Tensor:
    """The evaluation pipeline's input: normalised as the dataset does, resized bilinear. -> (1, C, S, S)."""
    return resize(normalized_image(image, data, path), spatial_size, "bilinear")[None]


@torch.no_grad()
def probability(model: torch.nn.Module, x: torch.Tensor, size: tuple) -> torch.Tensor:
    """Sigmoid of the model's "logits" upsampled bilinear to `size` (H, W), as engine.evaluate does."""
    return torch.sigmoid(upsample_logits(model_outputs(model, x)["logits"], size))[0, 0].cpu()


def predict_files(model, cfg: dict, files: List[Path], out: Path, device: torch.device, threshold: float = 0.5,
                  save_prob: bool = False, quiet: bool = True) -> List[Path]:
    """Write mask / overlay (/ prob) PNGs for each file; returns the written paths. OUT is created with the
    first output (a first image that cannot be predicted leaves nothing behind); a later image that fails is a
    UserError saying which images were written."""
    written = []
    for k, f in enumerate(files):
        try:
            image = read_image(f)
            x = prepare(image, cfg["data"], cfg["spatial_size"], f).to(device)
        except UserError as e:
            if not k:
                raise
            raise UserError(f"{one_line(e)}; stopped there: the {k} image(s) before it ({files[0].name} to "
                            f"{files[k - 1].name}) were written to {out}, the {len(files) - k} from it on were "
                            "not") from None
        prob = probability(model, x, image.shape[:2]).numpy()
        mask = prob > threshold
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{f.stem}_mask.png", out / f"{f.stem}_overlay.png"]
        Image.fromarray(mask.astype(np.uint8) * 255).save(paths[0])
        Image.fromarray(overlay(to_uint8_rgb(image), mask)).save(paths[1])
        if save_prob:
            paths.append(out / f"{f.stem}_prob.png")
            Image.fromarray(np.round(prob * 255).astype(np.uint8)).save(paths[2])
        written += paths
        if not quiet:
            print(f"{f} -> {paths[0].name} ({100 * mask.mean():.1f}% foreground)")
    return written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_threshold(args.threshold)
        check_out_folder(Path(args.out))
        device = pick_device(args.device)
        files, skipped = list_inputs(args.input)
        if skipped:
            print(f"warning: {summarize_skipped(skipped)}", file=sys.stderr)
        model, cfg = load_model(args.ckpt_path, args, device)
        written = predict_files(model, cfg, files, Path(args.out), device, args.threshold, args.save_prob, args.quiet)
    except (UserError, FileNotFoundError) as e:
        return report_user_error(e)
    except OSError as e:  # a write failing after the checks (disk full, a folder named like an output, ...)
        print(f"error: predicting into {args.out} stopped: {e}", file=sys.stderr)
        return 2
    print(f"{len(files)} image(s) -> {len(written)} files in {args.out} "
          f"({cfg['method']}, {data_spec(cfg['data']).name}, {cfg['spatial_size']} px, device {device})")
    return 0
