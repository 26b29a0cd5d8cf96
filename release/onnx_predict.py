"""`python run.py predict --model BUNDLE_OR_ONNX`: an exported model run with onnxruntime, without torch.

    python run.py predict --model BUNDLE --input images/ --out pred/ [--save_prob] [--threshold T]

A bundle folder's files are checked against its SHA256SUMS first (a mismatch names the file); its model card
gives the threshold (--threshold overrides it). The outputs and inputs are those of the torch predict
(engine.predict_io). This module and what it imports never import torch.
"""
from pathlib import Path
from typing import List, Optional

import numpy as np

from common.errors import OneLineParser, UserError, command_name, report_user_error
from engine.predict_io import (
    check_channels,
    check_out_folder,
    check_threshold,
    inputs_with_warning,
    predict_each,
    run_predict,
)
from release.bundle import DIVISOR_NAME, INPUT_NAME, BundleError, check_interface, locate_model


def build_parser():
    p = OneLineParser(prog=command_name("run.py predict --model"),
                      description="Segment new images with an exported model (onnxruntime, no torch).")
    p.add_argument("--model", required=True, help="an exported bundle folder (run.py export) or its model.onnx")
    p.add_argument("--input", nargs="+", required=True, help="image files (jpg/png/dcm) and/or folders of them")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability threshold of the mask, 0 < t < 1 (default: the model card's, else 0.5)")
    p.add_argument("--save_prob", action="store_true", help="also write the probability map (0-255 PNG)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--quiet", action="store_true", help="no line per image")
    return p


class OnnxModel:
    """An exported model in an onnxruntime session: images as read_image returns them -> probability maps."""

    def __init__(self, path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # warnings about unused initialisers etc. are not the user's business
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable or invalid files
            raise BundleError(f"{path}: onnxruntime cannot load it ({' '.join(str(e).split())[:300]})") from None
        described = [(i.name, i.shape, i.type) for i in self.session.get_inputs()]
        outputs = [(o.name, o.shape, o.type) for o in self.session.get_outputs()]
        self.channels, self.takes_divisor = check_interface(described, outputs, path)

    def batch(self, images: np.ndarray, eight_bit: bool = True) -> np.ndarray:
        """(N, C, H, W) float32 in the images' own range -> (N, 1, H, W) probabilities."""
        feed = {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)}
        if self.takes_divisor:
            feed[DIVISOR_NAME] = np.array([255.0 if eight_bit else 1.0], np.float32)
        return self.session.run(None, feed)[0]

    def probability(self, image: np.ndarray) -> np.ndarray:
        """One image as `read_image` returns it ((H, W, 3) or (H, W)) -> (H, W) probabilities."""
        x = image.astype(np.float32)
        x = x.transpose(2, 0, 1)[None] if x.ndim == 3 else x[None, None]
        return self.batch(x, image.dtype == np.uint8)[0, 0]


def predict_files(model: OnnxModel, files: List[Path], out: Path, threshold: float, save_prob: bool = False,
                  quiet: bool = True) -> List[Path]:
    """Write mask / overlay (/ prob) PNGs for each file (channels checked for all first); the written paths."""
    check_channels(files, model.channels, "the model")
    return predict_each(files, out, lambda image, path: model.probability(image), threshold, save_prob, quiet)


def card_threshold(card: Optional[dict]) -> float:
    """The model card's predict_threshold (0.5 without a card)."""
    value = (card or {}).get("predict_threshold", 0.5)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise BundleError(f"the model card's predict_threshold is {value!r}, expected a number strictly between 0 "
                          "and 1 (or pass --threshold)")
    return float(value)


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> str:
        if args.threshold is not None:
            check_threshold(args.threshold)
        check_out_folder(Path(args.out))
        if args.threads < 0:
            raise UserError(f"--threads is {args.threads}, expected 0 (onnxruntime's default) or more")
        onnx_path, card = locate_model(args.model)
        threshold = args.threshold if args.threshold is not None else card_threshold(card)
        files = inputs_with_warning(args.input)
        model = OnnxModel(onnx_path, args.threads)
        written = predict_files(model, files, Path(args.out), threshold, args.save_prob, args.quiet)
        return (f"{len(files)} image(s) -> {len(written)} files in {args.out} ({onnx_path}, onnxruntime, "
                f"threshold {threshold})")
    return run_predict(args.out, body)


def dispatch(argv: list) -> int:
    """`run.py predict ...`: with --model, this module (onnxruntime); otherwise the torch predict."""
    if any(a == "--model" or a.startswith("--model=") for a in argv):
        if any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in argv):
            return report_user_error(UserError("predict takes --model (an exported bundle, onnxruntime) or "
                                               "--ckpt_path (a checkpoint, torch), not both"))
        return main(argv)
    from engine.predict import main as torch_main
    return torch_main(argv)
