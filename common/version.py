"""The package version (the one place it is written; pyproject.toml reads it) and the code's git commit."""
import subprocess
from pathlib import Path

__version__ = "0.1.0"

REPO = Path(__file__).resolve().parents[1]


def git_commit(short: bool = True) -> str | None:
    """The commit of the checkout this code runs from (12 hex digits, or all 40 with `short=False`; with
    `+changes` when files differ from it), or None when the code is not in a git checkout or git is not
    installed."""
    if not (REPO / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12" if short else "--verify", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def version_text(prog: str) -> str:
    """`PROG (gazesup 0.1.0, commit abc123)`: what every command's --version prints."""
    commit = git_commit()
    return f"{prog} (gazesup {__version__}, {'commit ' + commit if commit else 'commit unknown'})"


def install_problem() -> str:
    """Why the shipped configs (presets, dataset specs) cannot be found, or "" when they can. A plain
    `pip install .` copies the packages into site-packages without configs/; an editable install does not."""
    if (REPO / "configs").is_dir():
        return ""
    return (f"; this copy of the code ({REPO}) has no configs/ folder beside it, as after `pip install .`: "
            "install from a clone with `pip install -e .`")
