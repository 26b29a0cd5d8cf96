"""The learning rate of every training iteration equals the authors' loop's (med-air/GazeSup): their
`BaseTrainer.run()` calls `_epoch_begin_hook()` (which sets the lr from `self.epoch` through
`adjust_learning_rate`) before `self.epoch += 1`, with `self.epoch` starting at 1.

Real tiny runs (`run.main`) are checked, iteration by iteration, on the lr the optimizer actually held when it
stepped (a global optimizer step hook) and on the lr written to losses.csv, for several epoch lengths, with
and without warm-up, and across a resume."""
import csv
import math
import shutil
from pathlib import Path

import pytest
from torch.optim.optimizer import register_optimizer_step_pre_hook

import run
from tests.helpers import only_run_dir, tiny_argv, tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
LR, LR_MIN, NUM_TRAIN = 1e-2, 1e-4, 8


def authors_lrs(max_ite: int, steps_per_epoch: int, warmup: int, scheduler: str = "cos") -> list:
    """The lr of iterations 1..max_ite, transcribed from the authors' run() + _epoch_begin_hook +
    adjust_learning_rate, with a loader of `steps_per_epoch` batches."""
    total_epoch = max_ite // steps_per_epoch + 1
    state = {"epoch": 1, "iteration": 1, "lr": LR}  # the optimizer starts at --lr

    def epoch_begin_hook():
        if scheduler == "cos":
            epoch = state["epoch"]
            if epoch < warmup:
                state["lr"] = LR * epoch / warmup
            else:
                state["lr"] = LR_MIN + (LR - LR_MIN) * 0.5 * (
                    1.0 + math.cos(math.pi * (epoch - warmup) / (total_epoch - warmup)))

    lrs = []
    loader = iter(range(steps_per_epoch))
    epoch_begin_hook()
    while state["iteration"] <= max_ite:
        try:
            next(loader)
        except StopIteration:
            epoch_begin_hook()
            loader = iter(range(steps_per_epoch))
            next(loader)
            state["epoch"] += 1
        lrs.append(state["lr"])  # _update steps with the optimizer's current lr
        state["iteration"] += 1
    return lrs


def test_transcription_shifts_the_schedule_by_one_epoch():
    """The transcription itself: epochs 1 and 2 share lr(1), epoch k >= 2 trains at lr(k - 1)."""
    lrs = authors_lrs(max_ite=9, steps_per_epoch=2, warmup=0)  # 5 epochs
    per_epoch = [lrs[i] for i in range(0, 9, 2)]
    cos = [LR_MIN + (LR - LR_MIN) * 0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(1, 5)]
    assert per_epoch == [cos[0], cos[0], cos[1], cos[2], cos[3]]
    assert all(lrs[i] == lrs[i + 1] for i in range(0, 8, 2))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data"), num_train=NUM_TRAIN, num_test=1)


def train(root: Path, exp: Path, *extra: str) -> list:
    """A real run; the lr of the optimizer's param group at each optimizer step."""
    seen = []

    def record(optimizer, args, kwargs):
        seen.append(optimizer.param_groups[0]["lr"])

    handle = register_optimizer_step_pre_hook(record)
    try:
        argv = tiny_argv(root, exp, "--lr", str(LR), "--lr_min", str(LR_MIN), "--log_step", "1",
                         "--val_step", "1000", "--quiet", *extra)
        assert run.main(argv) == 0
    finally:
        handle.remove()
    return seen


def logged_lrs(run_dir: Path) -> list:
    with open(run_dir / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    return [(int(r["iteration"]), float(r["lr"])) for r in rows]


@pytest.mark.parametrize("batch_size,warmup,scheduler", [(8, 0, "cos"), (4, 0, "cos"), (3, 0, "cos"),
                                                         (4, 3, "cos"), (8, 4, "cos"), (3, 0, "none")])
@pytest.mark.slow
def test_every_iteration_trains_at_the_authors_lr(data_root, tmp_path, batch_size, warmup, scheduler):
    """Epoch lengths 1, 2 and 3 steps (8 images, batch 8 / 4 / 3, the last batch partial); warm-up of 3 and 4
    epochs (compared with the epoch counter, as theirs); a constant lr without a scheduler."""
    max_ite = 7
    spe = math.ceil(NUM_TRAIN / batch_size)
    seen = train(data_root, tmp_path / "exp", "-bs", str(batch_size), "--max_ite", str(max_ite),
                 "--lr_scheduler", scheduler, "--warmup_ite", str(warmup), "--save_step", "1000")
    expected = authors_lrs(max_ite, spe, warmup, scheduler)
    assert seen == expected  # bit for bit: the same expression in the same order
    logged = logged_lrs(only_run_dir(tmp_path / "exp"))
    assert [i for i, _ in logged] == list(range(1, max_ite + 1))
    assert [lr for _, lr in logged] == pytest.approx(expected, rel=1e-8, abs=0)  # written with 9 digits
    if scheduler == "cos" and warmup == 0 and spe > 1:  # the shift is visible: epochs 1 and 2 share lr(1)
        assert seen[0] == seen[spe] != seen[2 * spe]


@pytest.mark.slow
def test_a_resumed_run_keeps_the_authors_schedule(data_root, tmp_path):
    """Stopped mid-epoch 2 (3 steps per epoch, checkpoint at iteration 4), resumed: iterations 5..8 train at
    the lr the uninterrupted loop gives them (the authors' own resume restarts the epoch; this one does not)."""
    common = ("-bs", "3", "--max_ite", "8", "--lr_scheduler", "cos", "--warmup_ite", "2", "--save_step", "4")
    train(data_root, tmp_path / "a", *common)
    # a copy of the run as it was at iteration 4 (in place, resuming an older checkpoint is refused)
    copy = tmp_path / "b" / "run"
    shutil.copytree(only_run_dir(tmp_path / "a"), copy)
    shutil.copyfile(copy / "model_ite4.pth", copy / "model_latest.pth")
    seen = train(data_root, tmp_path / "b", *common, "--resume", "--ckpt_path", str(copy))
    assert seen == authors_lrs(8, 3, 2)[4:]
