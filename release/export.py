"""`python run.py export --ckpt_path RUN|FILE.pth --out DIR`: a release bundle (see release.bundle).

The ONNX graph is the evaluation pipeline of engine.evaluate / engine.predict, in one graph from the image to
the probability map: the dataset spec's normalisation (common.dataspec.DataSpec.normalize), bilinear resize
to the run's spatial_size (align_corners=False, as datasets.segmentation.resize), the level networks without
the feature propagation and the mean of their logits (models.segmentation_net), bilinear resize back to the
image's H x W (align_corners=False, as engine.evaluate.upsample_logits), sigmoid. It is exported with torch's
TorchScript-based exporter (dynamo=False), whose traced shapes give dynamic batch, height and width, and
checked against the torch model on a probe batch before anything is written.
"""
import datetime
import json
import shutil
import sys
from argparse import Namespace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from common.checksums import BUNDLE_CARD, BUNDLE_CARD_MD, BUNDLE_ONNX, BUNDLE_WEIGHTS, SUMS_NAME, sums_text
from common.dataspec import IMAGENET_MEAN, IMAGENET_STD, DataSpec, load_spec, spec_record
from common.errors import OneLineParser, UserError, command_name, report_user_error
from common.files import write_json, write_text_atomic
from common.version import git_commit
from engine.evaluate import model_outputs
from engine.predict import add_model_shape_flags, resolve_config
from engine.predict_io import check_out_folder, check_threshold
from engine.restore import restored_model
from models.checkpoint import save_checkpoint
from parse_args import default_settings
from release.bundle import DIVISOR_NAME, INPUT_NAME, OUTPUT_NAME, build_card, card_markdown, ids_digest, needs_divisor

OPSET = 18  # Resize-18 (linear, half_pixel = align_corners=False); onnxruntime runs opsets up to 23
PROBE_TOLERANCE = 1e-4  # max abs difference of probabilities, ONNX vs torch, accepted at export


class ExportError(UserError):
    """An export that cannot be done as asked; the message names the flag or file."""


class InferenceGraph(torch.nn.Module):
    """image (N, C, H, W) in the image's own range [, divisor (1,)] -> probability (N, 1, H, W)."""

    def __init__(self, model: torch.nn.Module, spec: DataSpec, spatial_size: int):
        super().__init__()
        self.model, self.size = model, spatial_size
        self.zscore = spec.normalization == "per_image_zscore"
        self.takes_divisor = needs_divisor(spec)
        if not self.zscore:
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if spec.normalization == "imagenet" else spec.normalization
            shape = (1, len(mean), 1, 1)
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape), persistent=False)

    def normalize(self, x: torch.Tensor, divisor: Optional[torch.Tensor]) -> torch.Tensor:
        """DataSpec.normalize for a batch: z-score over each image (all channels), or (x / 255 - mean) / std
        (3-channel images are always 8-bit as read_image returns them; a 1-channel image's divisor is given)."""
        if self.zscore:
            # mean and std (numpy's: ddof 0) reduced in float64: a float32 reduction over a 16-bit image drifts
            # from numpy's pairwise float32 sums by up to ~1e-4 of the std; in float64 both round to the same
            x64 = x.double()
            mean = x64.mean(dim=(1, 2, 3), keepdim=True)
            std = (x64 - mean).square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
            std = torch.where(std > 0, std, torch.ones_like(std))
            return (x - mean.float()) / std.float()
        x = x / (divisor if divisor is not None else 255.0)
        return (x - self.mean) / self.std

    def forward(self, image: torch.Tensor, divisor: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.normalize(image, divisor)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        logits = model_outputs(self.model, x)["logits"].float()
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)


def export_onnx(graph: InferenceGraph, channels: int, path: Path, opset: int = OPSET) -> None:
    """Trace `graph` on a probe image and write the ONNX file with dynamic N, H, W."""
    import warnings

    size = graph.size
    probe = (torch.rand(1, channels, size + 3, size + 5) * 255,)
    names = [INPUT_NAME]
    if graph.takes_divisor:
        probe += (torch.tensor([255.0]),)
        names.append(DIVISOR_NAME)
    axes = {INPUT_NAME: {0: "N", 2: "H", 3: "W"}, OUTPUT_NAME: {0: "N", 2: "H", 3: "W"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python ifs on shapes fixed by the resize
        torch.onnx.export(graph, probe, str(path), input_names=names, output_names=[OUTPUT_NAME],
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)


def check_against_torch(graph: InferenceGraph, channels: int, path: Path, seed: int = 0) -> float:
    """Max abs difference of ONNX (onnxruntime) and torch probabilities on a probe batch of 2 images at a size
    other than spatial_size; an ExportError above PROBE_TOLERANCE."""
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(2, channels, graph.size * 3 // 2 + 1, graph.size - 3, generator=generator) * 255
    divisor = torch.tensor([255.0])
    with torch.no_grad():
        ref = graph(x, divisor if graph.takes_divisor else None).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: x.numpy()}
    if graph.takes_divisor:
        feed[DIVISOR_NAME] = divisor.numpy()
    diff = float(np.abs(session.run(None, feed)[0] - ref).max())
    if not diff <= PROBE_TOLERANCE:
        raise ExportError(f"the exported ONNX model differs from the torch model by {diff:.2e} (max abs "
                          f"probability, tolerance {PROBE_TOLERANCE}) on a probe batch; nothing was written")
    return diff


# ---------------------------------------------------------------- what the card says
def code_commit() -> str:
    """The full commit of this code (with `+changes` when the tree differs), or 'unknown'."""
    return git_commit(short=False) or "unknown"


def read_metrics(run_dir: Optional[Path]) -> Optional[dict]:
    """Final and best test metrics (Dice, IoU, HD95) from the run's metrics.json, or None."""
    path = run_dir / "metrics.json" if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = ("mdice", "miou", "mhd95", "num_images")
    final = summary.get("final") or {}
    best = summary.get("best") or {}
    return {"final": {**{k: final.get(k) for k in keys}, "iteration": summary.get("final_iteration")},
            "best": {**{k: (best.get("test") or {}).get(k) for k in keys}, "iteration": best.get("iteration"),
                     "selected_on": best.get("selected_on")},
            "status": summary.get("status")}


def checkpoint_record(path: Path, ckpt: dict, config: dict, metrics: Optional[dict], recorded: bool) -> dict:
    """Which checkpoint this is: its file, iteration, and whether it is the final or the selected (best) one."""
    iteration = ckpt.get("iteration")
    record = {"file": path.name, "iteration": iteration, "which": "unknown", "selected_on": None}
    if not recorded:
        best = ckpt.get("best_performance")
        record.update(which="unknown (a paper-format checkpoint records neither its split nor its selection)",
                      best_performance_recorded=float(best) if isinstance(best, (int, float, np.floating)) else None,
                      best_iteration_recorded=ckpt.get("best_iteration"))
        return record
    selected_on = "held-out part of the training split (--val_fraction)" if config.get("val_fraction", 0) > 0 \
        else "test split"
    best_it = (metrics or {}).get("best", {}).get("iteration")
    final_it = (metrics or {}).get("final", {}).get("iteration")
    if path.name == "model_best.pth" or (best_it is not None and iteration == best_it and iteration != final_it):
        record.update(which="best", selected_on=selected_on)
    elif iteration is not None and iteration == config.get("max_ite"):
        record["which"] = "final"
    else:
        record["which"] = f"intermediate (iteration {iteration} of {config.get('max_ite')})"
    return record


def split_record(config: dict, recorded: bool) -> dict:
    """The training ids as training selected them (engine.train.split_ids): count and SHA-256 of the list."""
    from engine.train import split_ids

    if not recorded:
        return {"ids": None, "reason": "a paper-format checkpoint does not record its training split"}
    if not config.get("root"):
        return {"ids": None, "reason": "the checkpoint records no dataset root"}
    settings = {**default_settings(), **config}  # keys an older record lacks
    try:
        train, val = split_ids(Namespace(**settings))
    except (UserError, OSError) as e:
        return {"ids": None, "reason": f"the run's split file could not be read at export ({e})"}
    record = {"file": str(Path(settings["root"]) / f"{settings['train_split']}.txt"), "ids": len(train),
              "ids_sha256": ids_digest(train), "data_size_rate": settings["data_size_rate"]}
    if val:
        record.update(val_ids=len(val), val_ids_sha256=ids_digest(val), val_fraction=settings["val_fraction"])
    return record


def plain(value):
    """Settings as JSON / weights_only-safe values (tuples as lists, paths as strings)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ---------------------------------------------------------------- the command
def build_parser():
    p = OneLineParser(prog=command_name("run.py export"), description="Write a release bundle: model.onnx (pre- and "
                      "post-processing inside), weights.pth, model_card.json/.md, SHA256SUMS.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint .pth or a run folder (its model_best.pth)")
    p.add_argument("--out", required=True, help="the bundle folder to create (must not exist, or be empty)")
    p.add_argument("--threshold", type=float, default=0.5, help="the mask threshold predict will use (0 < t < 1)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument("--quiet", action="store_true")
    g = p.add_argument_group("for checkpoints that do not record them (the paper's)")
    g.add_argument("--spatial_size", type=int, default=None, help="network input side (the paper's scripts: 224)")
    g.add_argument("--data", default=None, help="dataset name or spec file (default: by channel count)")
    g.add_argument("--in_channels", type=int, default=None)
    add_model_shape_flags(g)
    g.add_argument("--thresholds", type=lambda s: [float(t) for t in s.split(",")], default=None,
                   help="the levels' thresholds, for the card (default: the dataset spec's)")
    return p


def check_bundle_out(out: Path) -> None:
    """--out: a new folder (or an empty one) that can be created; nothing is created here."""
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--out {out} is a folder that is not empty; give a new folder for the bundle")
    check_out_folder(out)


def export_bundle(args: Namespace) -> tuple[Path, dict]:
    """Build everything in a temporary folder beside --out, then rename it to --out; (out, card)."""
    out = Path(args.out)
    check_threshold(args.threshold)
    check_bundle_out(out)
    if not 13 <= args.opset <= 23:
        raise ExportError(f"--opset is {args.opset}; expected 13 to 23 (default {OPSET})")
    args.device = None
    restored = resolve_config(args, args.ckpt_path)
    spec = load_spec(restored.config["data"])  # the spec the run recorded (a DataSpec), or a name or path
    config = plain({**restored.config, "data": spec.source if isinstance(restored.config["data"], DataSpec)
                    else str(restored.config["data"])})
    model = restored_model(restored).eval()
    unknown = []
    if not restored.recorded:
        unknown = ["training split and data root", "training flags (optimiser, schedule, iterations, seed)",
                   "which checkpoint this is (final or best) and what it was selected on", "test metrics",
                   "the code commit that trained it"]
        if config.get("data") and args.data is None:
            unknown.append(f"the dataset: the normalisation is the built-in {config['data']!r} (by channel count)")
    if args.thresholds and restored.recorded:
        raise ExportError(f"--thresholds is for checkpoints that do not record their settings; {restored.path} "
                          "records them")
    thresholds = None
    if config["method"] == "gaze_sup":
        try:
            thresholds = spec.level_thresholds(config["num_levels"], args.thresholds or config.get("thresholds"))
        except UserError:
            unknown.append("the levels' pseudo-mask thresholds")
        if not restored.recorded:
            config["thresholds"] = thresholds  # weights.pth then records them for --test and predict
    metrics = read_metrics(restored.run_dir) if restored.recorded else None
    split = split_record(config, restored.recorded)
    if restored.recorded and metrics is None:
        unknown.append("test metrics: no metrics.json beside the checkpoint")
    if restored.recorded and split["ids"] is None:
        unknown.append(f"training split: {split['reason']}")
    card = build_card(config=config, spec=spec, thresholds=thresholds,
                      checkpoint=checkpoint_record(restored.path, restored.ckpt, config, metrics, restored.recorded),
                      metrics=metrics, split=split, threshold=args.threshold,
                      commit=code_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                          timespec="seconds"), opset=args.opset, unknown=unknown)
    tmp = out.with_name(f".{out.name}.export-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        graph = InferenceGraph(model, spec, config["spatial_size"]).eval()
        export_onnx(graph, config["in_channels"], tmp / BUNDLE_ONNX, args.opset)
        card["onnx"]["probe_max_abs_diff"] = check_against_torch(graph, config["in_channels"], tmp / BUNDLE_ONNX)
        weights = {"state_dict": restored.state_dict, "args": config, "iteration": restored.ckpt.get("iteration"),
                   "data_spec": spec_record(spec)}  # the resolved spec, as runs record it
        save_checkpoint(tmp / BUNDLE_WEIGHTS, weights)
        write_json(tmp / BUNDLE_CARD, card)
        write_text_atomic(tmp / BUNDLE_CARD_MD, card_markdown(card))
        files = [BUNDLE_ONNX, BUNDLE_WEIGHTS, BUNDLE_CARD, BUNDLE_CARD_MD]
        write_text_atomic(tmp / SUMS_NAME, sums_text(tmp, files))
        if out.is_dir():  # an empty folder given as --out
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out, card


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out, card = export_bundle(args)
    except (UserError, FileNotFoundError) as e:
        return report_user_error(e)
    if not args.quiet:
        print(f"exported {args.ckpt_path} -> {out}: {', '.join(sorted(p.name for p in out.iterdir()))} "
              f"(ONNX vs torch on a probe batch: max abs {card['onnx']['probe_max_abs_diff']:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
