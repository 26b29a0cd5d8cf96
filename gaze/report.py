"""Gaze-map quality: Dice against the ground truth, a printed/JSON report and a PNG sheet.

Dice is computed between (map > 0.5) and the mask in two ways:
  soft GT   as the paper's notebooks: g = mask / 255 (not binarised), 2 sum(p g) / (sum p + sum g + 1e-6)
  binary GT g = (mask / 255 > 0.5), same formula
Maps and masks are read back from their files, i.e. what training will see.
"""

import cv2
import numpy as np

from common.contours import draw_contours


def dice(pred: np.ndarray, gt: np.ndarray, eps: float = 1e-6) -> float:
    """2 sum(p g) / (sum p + sum g + eps), sums in float64; pred boolean, gt in [0, 1], same shape."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt)
    inter = g[p].sum(dtype=np.float64)
    return float(2.0 * inter / (np.count_nonzero(p) + g.sum(dtype=np.float64) + eps))


def map_dice(gaze_map: np.ndarray, mask: np.ndarray) -> tuple:
    """(soft-GT Dice, binary-GT Dice) of (gaze_map > 0.5) against mask; both arrays in [0, 1], same shape."""
    p = gaze_map > 0.5
    return dice(p, mask), dice(p, mask > 0.5)


def summarise(per_image: dict) -> dict:
    """{name: list of (soft, binary)} -> {name: {"n", "soft_gt", "binary_gt"}} (means over images)."""
    out = {}
    for name, values in per_image.items():
        a = np.asarray(values, dtype=np.float64).reshape(-1, 2)
        out[name] = {"n": int(len(a)),
                     "soft_gt": float(a[:, 0].mean()) if len(a) else None,
                     "binary_gt": float(a[:, 1].mean()) if len(a) else None}
    return out


def format_report(result: dict) -> str:
    """Human-readable summary of a make_gaze_maps result."""
    lines = [f"gaze maps for {result['n_ids']} {result['data']} image(s) -> {result['out_dir']}"]
    for note in result.get("notes") or []:
        lines.append(f"  note: {note}")
    for step in result["steps"]:
        changed = result.get("changed", {}).get(step, 0)
        lines.append(f"  {step:8s} written {result['written'][step]:5d} ({changed} of them: inputs changed)  "
                     f"up to date {result['skipped'][step]:5d}"
                     f"  {result['time_s'].get(step, 0.0):7.1f} s")
    if result.get("dropped_fixations"):
        lines.append(f"  {result['dropped_fixations']} fixation(s) outside their image dropped (--outside drop)")
    for key, what in (("missing_images", "images not found (no CRF for them)"),
                      ("missing_masks", "masks not found (not in the Dice report)"),
                      ("images_without_fixations", "images in ROOT without fixations")):
        ids = result.get(key) or []
        if ids:
            more = f" ... (+{len(ids) - 3})" if len(ids) > 3 else ""
            lines.append(f"  {len(ids)} {what}: {', '.join(ids[:3])}{more}")
    if result.get("report_skipped"):
        lines.append(f"  Dice report skipped: {result['report_skipped']}")
    if result.get("dice"):
        lines.append("  Dice of (map > 0.5), mean over images:   GT = mask/255 (paper)   GT binarised")
        for name, d in result["dice"].items():
            if d["n"]:
                lines.append(f"    {name:8s} ({d['n']:4d} images)               {d['soft_gt']:.4f}"
                             f"              {d['binary_gt']:.4f}")
            else:
                lines.append(f"    {name:8s} no images with both a map and a mask")
    lines.append(f"  total {result['time_s']['total']:.1f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- PNG sheet

PANEL = 192  # panel height in pixels


def _panel(rgb: np.ndarray, height: int = PANEL) -> np.ndarray:
    h, w = rgb.shape[:2]
    return cv2.resize(rgb, (max(1, round(w * height / h)), height), interpolation=cv2.INTER_AREA)


def _colour(gaze_map: np.ndarray) -> np.ndarray:
    u8 = np.clip(gaze_map * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def _contour(rgb: np.ndarray, mask) -> np.ndarray:
    """The GT outline in white (nothing without a mask)."""
    if mask is None:
        return rgb
    return draw_contours(rgb, mask > 0.5, (255, 255, 255), max(1, rgb.shape[0] // 200))


def _text(img: np.ndarray, s: str) -> np.ndarray:
    cv2.putText(img, s, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, s, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def panel_label(name: str, gaze_map, mask) -> str:
    """A map panel's caption: its name and, with a mask, its Dice (map > 0.5 against the mask, soft GT: the
    report's first column), so a reader can tell a good map from a bad one at a glance."""
    if gaze_map is None:
        return f"{name}: not computed"
    if mask is None:
        return name
    return f"{name}  Dice {100 * map_dice(gaze_map, mask)[0]:.1f}"


def sheet_row(image, xs, ys, heatmap, crf, mask, title: str) -> np.ndarray:
    """One row: image with fixations, heatmap, CRF map (each with the GT contour in white, and its Dice).

    Args:
        image: RGB uint8 (H, W, 3) or None (drawn gray); xs, ys: normalised fixation coordinates.
        heatmap, crf, mask: float (H, W) in [0, 1] or None.
    """
    shape = next(a.shape[:2] for a in (image, heatmap, crf, mask) if a is not None)
    h, w = shape
    base = image.copy() if image is not None else np.full((h, w, 3), 96, np.uint8)
    r = max(2, round(min(h, w) / 80))
    for x, y in zip(xs, ys):
        cv2.circle(base, (int(round(x * (w - 1))), int(round(y * (h - 1)))), r, FIXATION_RGB, -1)
    first = _panel(_contour(base, mask))
    panels = [_text(first, title[:max(4, first.shape[1] // 9)])]
    for name, m in (("heatmap", heatmap), ("CRF", crf)):
        p = _contour(_colour(m), mask) if m is not None else np.full((h, w, 3), 64, np.uint8)
        panels.append(_text(_panel(p), panel_label(name, m, mask)))
    return np.concatenate(panels, axis=1)


FIXATION_RGB = (255, 255, 0)
KEY_HEIGHT = 56


def key_row(width: int) -> np.ndarray:
    """The sheet's key: a colour bar of the map values 0 to 1 (the panels' colour map) and what the marks mean."""
    row = np.zeros((KEY_HEIGHT, width, 3), np.uint8)
    bar_w = min(width - 16, 256)
    bar = _colour(np.tile(np.linspace(0, 1, bar_w, dtype=np.float32), (14, 1)))
    row[20:34, 8:8 + bar_w] = bar
    for value in (0, 0.5, 1):
        x = 8 + round(value * (bar_w - 1))
        cv2.putText(row, f"{value:g}", (max(0, x - 6), 48), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                    cv2.LINE_AA)
    cv2.putText(row, "map value", (8, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    x = 8 + bar_w + 16
    cv2.circle(row, (x + 4, 12), 4, FIXATION_RGB, -1)
    cv2.putText(row, "fixation", (x + 14, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    cv2.line(row, (x, 30), (x + 9, 30), (255, 255, 255), 2)
    cv2.putText(row, "ground-truth outline", (x + 14, 34), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                cv2.LINE_AA)
    cv2.putText(row, "Dice: (map > 0.5) vs mask, %", (x, 50), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                cv2.LINE_AA)
    return row


def make_sheet(rows: list) -> np.ndarray:
    """Stack rows (different widths allowed) on a black background, with the key (key_row) below; RGB uint8."""
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(padded + [key_row(width)], axis=0)


def save_sheet(sheet: np.ndarray, path) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")
