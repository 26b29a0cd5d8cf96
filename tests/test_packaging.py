"""environment.yaml (conda) and the pip requirement files list the same packages and versions."""
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def pip_lines(name: str) -> set:
    lines = set()
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            lines |= pip_lines(line[3:].strip())
        elif line:
            lines.add(line)
    return lines


def test_environment_yaml_matches_requirements():
    env = yaml.safe_load((REPO / "environment.yaml").read_text())
    conda_pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert set(conda_pip) == pip_lines("requirements-dev.txt")


def test_readme_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m pytest -q tests" in ci and "python -m pytest -q tests" in (REPO / "README.md").read_text()
