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
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from common.dataspec import builtin_specs, load_spec
from common.errors import OneLineParser, command_name
from common.methods import METHODS
from datasets.segmentation import data_spec, normalized_image, resize
from engine.device import pick_device
from engine.evaluate import model_outputs, upsample_logits
from engine.predict_io import (
    check_channels,
    check_out_folder,
    check_threshold,
    inputs_with_warning,
    predict_each,
    run_predict,
)
from engine.restore import Restored, restore, restored_model
from engine.run_folder import RunError
from parse_args import EVALUATION, PREDICT_SAFE, _int_list, flags_with


def builtin_data_for(channels: int) -> Optional[str]:
    """The first built-in dataset spec (by name) taking `channels`-channel images: the normalisation of a paper
    checkpoint, which records no dataset (3 channels -> kvasir, 1 -> prostate)."""
    return next((n for n in builtin_specs() if load_spec(n).in_channels == channels), None)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=command_name("run.py predict"),
                      description="Segment new images with a trained checkpoint.")
    p.add_argument("--ckpt_path", required=True,
                   help="checkpoint .pth, a run folder (its model_best.pth) or an exported bundle (its weights.pth); "
                        "for onnxruntime without torch, pass the bundle as --model instead")
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
    add_model_shape_flags(p.add_argument_group("model shape, only for checkpoints that do not record it"))
    return p


def add_model_shape_flags(group) -> None:
    """The model-shape flags of a command that takes a paper-format checkpoint (predict, export): read off the
    weights when they can be, compared with the record when there is one (resolve_config)."""
    group.add_argument("-m", "--method", default=None, choices=list(METHODS))
    group.add_argument("--num_levels", type=int, default=None)
    group.add_argument("--features", type=_int_list, default=None, help="6 comma-separated U-Net widths")
    group.add_argument("--feat_dim", type=int, default=None)


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
    """Write mask / overlay (/ prob) PNGs for each file (engine.predict_io.predict_each); the written paths."""
    check_channels(files, cfg["in_channels"], f"--data {data_spec(cfg['data']).name}")

    def prob_of(image, path):
        x = prepare(image, cfg["data"], cfg["spatial_size"], path).to(device)
        return probability(model, x, image.shape[:2]).numpy()

    return predict_each(files, out, prob_of, threshold, save_prob, quiet)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> str:
        check_threshold(args.threshold)
        check_out_folder(Path(args.out))
        device = pick_device(args.device)
        files = inputs_with_warning(args.input)
        model, cfg = load_model(args.ckpt_path, args, device)
        written = predict_files(model, cfg, files, Path(args.out), device, args.threshold, args.save_prob, args.quiet)
        return (f"{len(files)} image(s) -> {len(written)} files in {args.out} "
                f"({cfg['method']}, {data_spec(cfg['data']).name}, {cfg['spatial_size']} px, device {device})")
    return run_predict(args.out, body)
