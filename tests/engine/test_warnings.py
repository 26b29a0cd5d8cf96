"""Warnings a run gives once, at start: a schedule that cannot work, an ETA over a day, no GPU."""
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from engine.train import eta_warning, schedule_warning
from tests.helpers import REPO, tiny_argv


def recipe(**kw) -> Namespace:
    values = {"lr_scheduler": "cos", "lr": 1e-2, "lr_min": 1e-4, "warmup_ite": 0, "max_ite": 15000}
    return Namespace(**{**values, **kw})


def test_schedule_under_one_epoch_trains_at_lr_min():
    text = schedule_warning(recipe(max_ite=100), steps_per_epoch=110)
    assert text and "--max_ite 100 is under two epochs (110 steps each)" in text
    assert "lr 0.0001 throughout (--lr_min)" in text and "at least 220 iterations" in text


def test_schedule_between_one_and_two_epochs_is_constant():
    text = schedule_warning(recipe(max_ite=200), steps_per_epoch=110)
    assert text and "lr 0.00505 throughout" in text and "--lr_min" not in text  # the cosine's midpoint


def test_schedule_of_two_epochs_or_no_schedule_is_fine():
    assert schedule_warning(recipe(max_ite=220), steps_per_epoch=110) is None
    assert schedule_warning(recipe(max_ite=15000), steps_per_epoch=110) is None
    assert schedule_warning(recipe(max_ite=10, lr_scheduler="none"), steps_per_epoch=110) is None


def test_eta_over_a_day():
    cpu = torch.device("cpu")
    text = eta_warning(15000, 62.0, cpu)  # the paper's recipe on a 2-core CPU
    assert text and "about 258 hours" in text and "kvasir_cpu" in text
    assert eta_warning(15000, 0.07, torch.device("cpu")) is None  # 18 minutes
    assert eta_warning(100, 86400 / 100, cpu) is None  # exactly a day: no warning


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU warning needs a machine without a GPU")
def test_cpu_run_warns_once_about_gpu_and_schedule(data_root, tmp_path):
    """8 training images, batch 4: 2 steps per epoch; 3 iterations under the cosine schedule is under two."""
    argv = tiny_argv(data_root, tmp_path / "exp", "--max_ite", "3", "--lr_scheduler", "cos", "--val_step", "3")
    out = subprocess.run([sys.executable, str(REPO / "run.py"), *argv, "--quiet"], capture_output=True, text=True,
                         timeout=300).stdout
    assert out.count("warning: no GPU visible: training on the CPU") == 1, out
    assert out.count("warning: --max_ite 3 is under two epochs (2 steps each)") == 1, out
    quiet = subprocess.run([sys.executable, str(REPO / "run.py"), *tiny_argv(data_root, tmp_path / "exp2"),
                            "--max_ite", "4", "--device", "cpu", "--val_step", "4", "--quiet"],
                           capture_output=True, text=True, timeout=300).stdout
    assert "warning" not in quiet, quiet
