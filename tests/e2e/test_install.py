"""Commands from any folder: `python /path/to/run.py` and the paper scripts with relative paths, and the console
commands of `pip install -e .` (pyproject.toml)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.version import __version__
from tests.helpers import REPO, TINY_MODEL, only_run_dir

TINY_RUN = ["--num_worker", "0", "-bs", "4", "--max_ite", "2", "--val_step", "2", "--device", "cpu", "--quiet",
            *TINY_MODEL]


def run(cmd: list, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # as a user's shell: the repository is not on the path
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600, env=env,
                          **kw)


def test_run_py_from_another_folder(tmp_path):
    done = run([sys.executable, REPO / "run.py", "--version"], tmp_path)
    assert done.returncode == 0 and f"gazesup {__version__}" in done.stdout, done.stderr


@pytest.mark.slow
def test_relative_paths_from_another_folder(data_root, tmp_path):
    """run.py and scripts/gazesup_kvasir_2_levels.sh read relative ROOT and EXP from the caller's folder."""
    (tmp_path / "data").symlink_to(data_root)
    done = run([sys.executable, REPO / "run.py", "--config", "kvasir_gazesup", "--root", "data", "--exp_path", "exp",
                *TINY_RUN], tmp_path)
    assert done.returncode == 0, done.stderr
    assert (only_run_dir(tmp_path / "exp") / "metrics.json").is_file()
    done = run([REPO / "scripts" / "gazesup_kvasir_2_levels.sh", "exp2", "data", *TINY_RUN], tmp_path)
    assert done.returncode == 0, done.stderr
    assert (only_run_dir(tmp_path / "exp2") / "metrics.json").is_file()


@pytest.mark.slow
def test_installed_console_commands(tmp_path):
    """`pip install -e .` into a fresh environment (that sees this one's packages): gazesup, gazesup-gaze,
    gazesup-prepare and `python -m gaze|prepare` work from any folder."""
    pytest.importorskip("setuptools", minversion="64")
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", env_dir], check=True)
    python, bin_dir = env_dir / "bin" / "python", env_dir / "bin"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert run([python, "-m", "gaze", "--version"], elsewhere).returncode != 0  # not installed yet: not found
    install = run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "-e", REPO, "--no-deps",
                   "--no-build-isolation"], elsewhere)
    assert install.returncode == 0, install.stderr
    for cmd, prog in [([bin_dir / "gazesup", "--version"], "gazesup"),
                      ([bin_dir / "gazesup", "predict", "--version"], "gazesup predict"),
                      ([bin_dir / "gazesup-gaze", "--version"], "gazesup-gaze"),
                      ([bin_dir / "gazesup-prepare", "kvasir", "--version"], "gazesup-prepare kvasir"),
                      ([python, "-m", "gaze", "--version"], "python -m gaze"),
                      ([python, "-m", "prepare", "--version"], "python -m prepare")]:
        done = run(cmd, elsewhere)
        assert done.returncode == 0 and done.stdout.startswith(f"{prog} (gazesup {__version__}"), (cmd, done)
    typo = run([bin_dir / "gazesup-prepare", "kvasir", "--src", "S", "--out", "O", "--split_dirr", "D"], elsewhere)
    assert typo.returncode == 2 and "did you mean --split-dir?" in typo.stderr


def test_pyproject_installs_every_package_and_module():
    """A new top-level package or module must be listed in pyproject.toml, or the installed commands miss it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    modules = {p.stem for p in REPO.glob("*.py")}
    assert set(tool["packages"]) == packages and set(tool["py-modules"]) == modules
