"""The embedded default: `python run.py --demo` makes synthetic data with simulated gaze, runs the gaze
pipeline and trains a narrow 2-level model that really learns (ensemble Dice >= 0.5)."""
import json

import pytest

import run


@pytest.mark.slow
def test_demo_runs_end_to_end_and_learns(tmp_path):
    assert run.main(["--demo", "--exp_path", str(tmp_path), "--quiet"]) == 0
    data = tmp_path / "demo_data"
    assert len(list((data / "gaze" / "crf_compat1").glob("*.jpg"))) == len(list((data / "images").glob("*.jpg")))
    (run_dir,) = (tmp_path / "0" / "kvasir").iterdir()
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert final["mdice"] >= 0.5 and final["mdice_1"] > 0 and final["mdice_2"] > 0
    assert (run_dir / "model_latest.pth").is_file() and (run_dir / "log.txt").is_file()
