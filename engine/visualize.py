"""TensorBoard images: predictions and references outlined on the network inputs (see common.contours)."""
import numpy as np
import torch

from common.contours import overlay, to_uint8_rgb
from common.dataspec import IMAGENET_MEAN, IMAGENET_STD


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A network input (C, H, W) back to (H, W, 3) uint8: 3 channels undo the ImageNet normalisation
    (Kvasir), 1 channel (prostate, per-image standardised) is min-max scaled."""
    x = image.detach().float().cpu()
    if x.shape[0] == 3:
        x = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return to_uint8_rgb(x[0].numpy())


@torch.no_grad()
def log_images(writer, model: torch.nn.Module, iteration: int, test_data, train_images: torch.Tensor,
               train_targets: torch.Tensor, gaze_sup: bool, count: int = 4) -> None:
    """TensorBoard images at the network input size: `images/test` (prediction green, ground truth red) for
    the first test images, and training images with each level's pseudo-mask (red) and that level's
    prediction (green), `images/train_level_<i>` (full_sup: `images/train`, ground truth red)."""
    from engine.evaluate import model_outputs

    was_training = model.training
    model.eval()
    n = min(count, len(test_data))
    if n:
        images = torch.cat(test_data.images[:n])
        preds = torch.sigmoid(model_outputs(model, images)["logits"].float()) > 0.5
        panels = []
        for image, pred, mask in zip(images, preds, test_data.masks[:n]):
            gt = torch.nn.functional.interpolate(mask[None, None].float(), size=image.shape[-2:], mode="nearest")
            panels.append(overlay(denormalize(image), pred[0].cpu().numpy(), gt[0, 0].numpy()))
        writer.add_images("images/test", np.stack(panels), iteration, dataformats="NHWC")
    outputs = model_outputs(model, train_images)
    for i in range(1, train_targets.shape[1] + 1) if gaze_sup else [0]:
        key, tag = (f"logits_{i}", f"images/train_level_{i}") if i else ("logits", "images/train")
        preds = (torch.sigmoid(outputs[key].float()) > 0.5)[:, 0].cpu().numpy()
        refs = train_targets[:, max(i - 1, 0)].cpu().numpy()
        panels = [overlay(denormalize(x), p, r) for x, p, r in zip(train_images, preds, refs)]
        writer.add_images(tag, np.stack(panels), iteration, dataformats="NHWC")
    model.train(was_training)
