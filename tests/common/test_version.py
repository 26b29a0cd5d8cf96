"""--version's text, and the hint for a copy of the code installed without its configs/."""
import pytest

import common.version as version
from common.dataspec import SpecError, load_spec
from tests.helpers import REPO


def test_version_text_names_package_and_commit():
    text = version.version_text("run.py")
    assert text.startswith(f"run.py (gazesup {version.__version__}, commit ")
    if (REPO / ".git").exists():
        assert "commit unknown" not in text


def test_a_copy_without_configs_says_how_to_install(tmp_path, monkeypatch):
    assert version.install_problem() == ""
    monkeypatch.setattr(version, "REPO", tmp_path)  # as site-packages after `pip install .`: no configs/
    assert "pip install -e ." in version.install_problem()
    with pytest.raises(SpecError, match="no configs/ folder"):  # the message a user of such a copy sees
        import common.dataspec as dataspec
        monkeypatch.setattr(dataspec, "BUILTIN_DIR", tmp_path / "configs" / "data")
        load_spec("kvasir")
