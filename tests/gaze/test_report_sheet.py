"""report.png's keys: each map panel names its Dice against the mask, and a key row holds the colour bar and
what the marks mean."""
import numpy as np

from gaze.report import KEY_HEIGHT, _colour, key_row, make_sheet, map_dice, panel_label, sheet_row


def square(lo: int, hi: int) -> np.ndarray:
    m = np.zeros((100, 120), np.float32)
    m[lo:hi, lo:hi + 20] = 1
    return m


def test_panel_label_gives_the_maps_dice():
    mask, half = square(20, 60), square(40, 60)
    assert panel_label("CRF", half, mask) == f"CRF  Dice {100 * map_dice(half, mask)[0]:.1f}"
    assert panel_label("CRF", mask, mask) == "CRF  Dice 100.0"
    assert panel_label("heatmap", half, None) == "heatmap"  # no mask: no Dice
    assert panel_label("CRF", None, mask) == "CRF: not computed"


def test_sheet_ends_with_the_key_row_and_its_colour_bar():
    mask = square(20, 60)
    rows = [sheet_row(None, [0.5], [0.5], mask, mask, mask, "a"), sheet_row(None, [], [], mask, None, None, "b")]
    sheet = make_sheet(rows)
    assert sheet.shape[0] == sum(r.shape[0] + 4 for r in rows) + KEY_HEIGHT
    key = sheet[-KEY_HEIGHT:]
    assert np.array_equal(key, key_row(sheet.shape[1]))
    bar = key[27, 8:8 + 256]  # the bar runs from the colour of 0 to the colour of 1
    assert np.array_equal(bar[0], _colour(np.zeros((1, 1), np.float32))[0, 0])
    assert np.array_equal(bar[-1], _colour(np.ones((1, 1), np.float32))[0, 0])
