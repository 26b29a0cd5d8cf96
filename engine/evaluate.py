"""Test-set evaluation: per-image Dice / IoU / HD95 for the evaluated prediction and each level."""
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datasets.segmentation import SegmentationDataset
from engine.metrics import dice_iou, hd95, summarize
from models.segmentation_net import MultiLevelNet


def autocast(device: torch.device, amp: str):
    """Mixed-precision context for "fp16"/"bf16"; a no-op for "none"."""
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


class TestData:
    """A test split decoded once: resized images (on `device`) and full-size masks, reused at every evaluation."""

    def __init__(self, dataset: SegmentationDataset, device, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.ids, self.images, self.masks = [], [], []
        self.total = len(dataset)  # over all ranks
        shard = list(range(rank, len(dataset), world_size))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=None,
                                             num_workers=num_workers)
        for sample in loader:
            self.ids.append(sample["id"])
            self.images.append(sample["image"][None].to(device))
            self.masks.append(sample["mask"][0].bool())

    def __len__(self) -> int:
        return len(self.ids)


def prediction_keys(outputs: dict) -> list[str]:
    """"logits" (the evaluated prediction: the level mean for gaze_sup) then "logits_1", "logits_2", ..."""
    levels = sorted((k for k in outputs if k.startswith("logits_") and k[7:].isdigit()), key=lambda k: int(k[7:]))
    return ["logits"] + levels


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TestData, amp: str = "none", save_pred: Path | None = None,
             gather=None, with_hd95: bool = True) -> tuple:
    """Evaluate `model` on `data`, batch size 1, as the paper: logits upsampled bilinear to the mask size,
    prediction = sigmoid > 0.5.

    Args:
        model: returns a dict with "logits" (and "logits_i" per level); called with propagate=False when it
            accepts it (the propagation is not needed for predictions).
        data: the decoded test split.
        amp: "none", "fp16" or "bf16" autocast.
        save_pred: folder for prediction PNGs (pred/<id>.png for the evaluated prediction, pred_<i>/ per level).
        gather: for data parallel runs, a function list -> list that collects every rank's rows.
        with_hd95: also compute HD95 (CPU; the slow part of an evaluation).
    Returns:
        (metrics dict: mdice, mdice_std, miou, miou_std, mhd95 and mdice_i, miou_i per level; per-image rows).
    """
    was_training = model.training
    model.eval()
    rows = []
    for image_id, image, mask in zip(data.ids, data.images, data.masks):
        with autocast(image.device, amp):
            outputs = model_outputs(model, image)
        row = {"id": image_id}
        for key in prediction_keys(outputs):
            pred = (torch.sigmoid(upsample_logits(outputs[key], mask.shape)) > 0.5)[0, 0].cpu()
            suffix = key[6:]  # "" or "_i"
            row["dice" + suffix], row["iou" + suffix] = dice_iou(pred, mask)
            if not suffix and with_hd95:
                row["hd95"] = hd95(pred.numpy(), mask.numpy())
            if save_pred is not None:
                folder = Path(save_pred) / ("pred" + suffix)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pred.numpy().astype(np.uint8) * 255).save(folder / f"{image_id}.png")
        rows.append(row)
    model.train(was_training)
    if gather is not None:
        rows = gather(rows)
    return summarize_rows(rows), rows


def upsample_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """Logits at the mask's size (bilinear, align_corners=False, as the paper), in float32."""
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


def model_outputs(model: torch.nn.Module, image: torch.Tensor) -> dict:
    """Predictions without the feature propagation (only training's consistency loss needs it)."""
    return model(image, propagate=False) if isinstance(model, MultiLevelNet) else model(image)


def summarize_rows(rows: list[dict]) -> dict[str, float]:
    metrics = {"num_images": len(rows)}
    for key in rows[0]:
        if key == "id":
            continue
        name, _, level = key.partition("_")
        mean, std = summarize([r[key] for r in rows])
        base = "m" + name + (f"_{level}" if level else "")
        metrics[base] = mean
        if not level:
            metrics[base + "_std"] = std
    return metrics
