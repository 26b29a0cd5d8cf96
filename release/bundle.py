"""A release bundle's model card and its ONNX model's interface, without torch.

    BUNDLE/model.onnx        image (N, C, H, W) float32 in the image's own range -> probability (N, 1, H, W)
    BUNDLE/weights.pth       {"state_dict", "args", "iteration"}: what --test and the torch predict read
    BUNDLE/model_card.json   what the model is and how it was made (`build_card`); model_card.md the same as text
    BUNDLE/SHA256SUMS        `sha256sum -c SHA256SUMS` format, one line per other file

The ONNX graph takes a second input, `divisor` (shape [1]), only for a 1-channel dataset spec with an explicit
{mean, std}: such a spec normalises x / 255 for 8-bit images and raw values otherwise, so the caller says
which (255 or 1). Every other spec's normalisation does not depend on the bit depth.
"""
import hashlib
import json
from pathlib import Path
from typing import Optional

from common.checksums import BUNDLE_CARD, BUNDLE_CARD_MD, BUNDLE_ONNX, SUMS_NAME, is_bundle, verify_folder
from common.dataspec import spec_record
from common.errors import UserError

CARD_FORMAT = "gazesup-model-card/1"
INPUT_NAME, DIVISOR_NAME, OUTPUT_NAME = "image", "divisor", "probability"


class BundleError(UserError):
    """A bundle or ONNX file that cannot be used; the message names the file and what was expected."""


def ids_digest(ids: list[str]) -> str:
    """SHA-256 of the id list as a split file holds it: one id per line, in order, each line ending in \\n."""
    return hashlib.sha256("".join(f"{i}\n" for i in ids).encode("utf-8")).hexdigest()


def needs_divisor(spec) -> bool:
    """Whether the spec's normalisation depends on the image's bit depth (a 1-channel explicit {mean, std})."""
    return not isinstance(spec.normalization, str) and spec.in_channels == 1


def build_card(*, config: dict, spec, thresholds: Optional[list], checkpoint: dict, metrics: Optional[dict],
               split: dict, threshold: float, commit: str, date: str, opset: int, unknown: list[str]) -> dict:
    """The model card (a pure function of what export gathered; see docs/how-to/export.md for each field)."""
    data = {**spec_record(spec), "source": spec.source}
    data["thresholds"] = {str(k): v for k, v in data["thresholds"].items()}  # JSON keys are strings
    normalization = data["normalization"]
    inputs = [{"name": INPUT_NAME, "shape": ["N", spec.in_channels, "H", "W"], "type": "float32",
               "values": "the image's own range: 0-255 for 8-bit images, raw values for 16-bit PNG and DICOM"}]
    if needs_divisor(spec):
        inputs.append({"name": DIVISOR_NAME, "shape": [1], "type": "float32",
                       "values": "255 for 8-bit images, 1 otherwise (the {mean, std} apply to x / divisor)"})
    return {
        "format": CARD_FORMAT,
        "method": config["method"],
        "levels": config.get("num_levels") if config["method"] == "gaze_sup" else None,
        "thresholds": thresholds,
        "features": list(config["features"]),
        "feat_dim": config["feat_dim"],
        "in_channels": config["in_channels"],
        "spatial_size": config["spatial_size"],
        "data": data,
        "training_split": split,
        "checkpoint": checkpoint,
        "metrics": metrics,
        "predict_threshold": threshold,
        "onnx": {"file": BUNDLE_ONNX, "opset": opset, "inputs": inputs,
                 "output": {"name": OUTPUT_NAME, "shape": ["N", 1, "H", "W"], "type": "float32",
                            "values": "foreground probability"},
                 "pipeline": [f"normalisation: {json.dumps(normalization)}",
                              f"bilinear resize to {config['spatial_size']} x {config['spatial_size']} "
                              "(align_corners=False, no antialiasing)",
                              "the level networks' logits, averaged" if config["method"] == "gaze_sup"
                              else "the network's logits",
                              "bilinear resize back to H x W (align_corners=False)", "sigmoid"]},
        "flags": config,
        "code_commit": commit,
        "exported": date,
        "unknown": unknown,
    }


def _fmt(value) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def card_markdown(card: dict) -> str:
    """model_card.md: the card for a reader (the JSON is the record)."""
    ckpt, split, metrics = card["checkpoint"], card["training_split"], card["metrics"] or {}
    lines = [f"# Model card: {card['method']} on {card['data']['name']}", "",
             f"Exported {card['exported']} from code commit {card['code_commit']}.", "",
             "## Model", "",
             f"- method: {card['method']}" + (f", {card['levels']} levels, thresholds {card['thresholds']}"
                                              if card["levels"] else ""),
             f"- U-Net widths: {card['features']}, feature dimension {card['feat_dim']}",
             f"- input: {card['in_channels']} channel(s), resized to {card['spatial_size']} x {card['spatial_size']}",
             f"- normalisation: {json.dumps(card['data']['normalization'])} (dataset spec {card['data']['name']})",
             f"- predict threshold: {card['predict_threshold']}", "",
             "## Checkpoint", "",
             f"- file: {ckpt.get('file')}, iteration {_fmt(ckpt.get('iteration'))}",
             f"- which: {ckpt.get('which')}; selected on: {_fmt(ckpt.get('selected_on'))}", "",
             "## Training split", ""]
    if split.get("ids") is not None:
        lines.append(f"- {split['ids']} training ids from {split.get('file')}, SHA-256 of the id list "
                     f"{split['ids_sha256']}" + (f"; {split['val_ids']} held out for selection (--val_fraction)"
                                                 if split.get("val_ids") else ""))
    else:
        lines.append(f"- unknown: {split.get('reason')}")
    lines += ["", "## Metrics (test split)", "", "| | Dice | IoU | HD95 | iteration |", "|---|---|---|---|---|"]
    for which in ("final", "best"):
        m = metrics.get(which) or {}
        lines.append(f"| {which} | {_fmt(m.get('mdice'))} | {_fmt(m.get('miou'))} | {_fmt(m.get('mhd95'))} | "
                     f"{_fmt(m.get('iteration'))} |")
    if card["unknown"]:
        lines += ["", "## Unknown", ""] + [f"- {u}" for u in card["unknown"]]
    lines += ["", "## ONNX model", "", f"- {card['onnx']['file']}, opset {card['onnx']['opset']}"]
    lines += [f"- input `{i['name']}`: {i['shape']} {i['type']}, {i['values']}" for i in card["onnx"]["inputs"]]
    out = card["onnx"]["output"]
    lines += [f"- output `{out['name']}`: {out['shape']} {out['type']}, {out['values']}",
              "- inside: " + "; ".join(card["onnx"]["pipeline"]), "",
              f"Check the files with `sha256sum -c {SUMS_NAME}`.", ""]
    return "\n".join(lines)


def locate_model(path) -> tuple[Path, Optional[dict]]:
    """(the ONNX file, the card or None) of --model: a bundle folder (checksums verified first, card required)
    or a bare .onnx file (no card: the threshold defaults to 0.5)."""
    path = Path(path)
    if path.is_dir():
        if not is_bundle(path):
            raise BundleError(f"--model {path} is a folder but not an exported bundle (no {SUMS_NAME} with "
                              f"{BUNDLE_ONNX}); pass the bundle folder or a .onnx file")
        verify_folder(path, required=(BUNDLE_ONNX, BUNDLE_CARD, BUNDLE_CARD_MD))
        card_path = path / BUNDLE_CARD
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise BundleError(f"{card_path}: cannot read the model card ({e})") from None
        if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
            raise BundleError(f"{card_path}: not a model card of this project (expected format {CARD_FORMAT})")
        return path / BUNDLE_ONNX, card
    if not path.is_file():
        raise BundleError(f"--model {path} not found (expected a bundle folder or a .onnx file)")
    if path.suffix.lower() != ".onnx":
        raise BundleError(f"--model {path}: expected a bundle folder or a .onnx file")
    return path, None


def check_interface(inputs: list, outputs: list, source) -> tuple[int, bool]:
    """(channels, takes a divisor) of an ONNX model from its inputs' and outputs' (name, shape, type), checked
    against a bundle's interface; anything else is a BundleError naming `source` and what was found."""
    def described(items) -> str:
        return ", ".join(f"{n} {list(s)} {t}" for n, s, t in items)

    expected = (f"input '{INPUT_NAME}' [N, C, H, W] float32 with C 1 or 3 and any H, W (optionally "
                f"'{DIVISOR_NAME}' [1]), output '{OUTPUT_NAME}' [N, 1, H, W]")
    names = [n for n, _, _ in inputs]
    ok = names in ([INPUT_NAME], [INPUT_NAME, DIVISOR_NAME]) and len(outputs) == 1
    if ok:
        _, shape, kind = inputs[0]
        _, out_shape, out_kind = outputs[0]
        ok = (kind == out_kind == "tensor(float)" and len(shape) == len(out_shape) == 4 and shape[1] in (1, 3)
              and all(not isinstance(d, int) for d in (shape[0], shape[2], shape[3]))
              and outputs[0][0] == OUTPUT_NAME and (out_shape[1] in (1, None) or isinstance(out_shape[1], str)))
    if not ok:
        raise BundleError(f"{source}: the model's interface is {described(inputs)} -> {described(outputs)}; "
                          f"expected {expected} (a model written by run.py export)")
    return inputs[0][1][1], len(inputs) == 2
