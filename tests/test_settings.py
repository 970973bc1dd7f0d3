"""Environment variables: read in one place (settings()), one rule for "true", clear errors for values that cannot work."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lungseg_io
import lungseg_utils as L


@pytest.mark.parametrize("value, quick", [("1", True), ("TRUE", True), (" yes ", True), ("on", True),
                                          ("0", False), ("false", False), ("", False), ("2", False)])
def test_one_rule_for_true(monkeypatch, value, quick):
    monkeypatch.setenv("LUNGSEG_QUICK", value)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert L.settings().quick is quick and L.settings().hub_offline is quick and L.is_quick_mode() is quick


def test_paths_come_from_the_environment_else_the_defaults(monkeypatch, tmp_path):
    for name in ("LUNGSEG_DATA_DIR", "LUNGSEG_CACHE_DIR", "LUNGSEG_CHECKPOINT", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    defaults = L.settings()
    assert defaults.data_dir == L.REPO_DIR / "data" and defaults.checkpoint is None
    assert defaults.cache_dir == Path.home() / ".cache" / "lungseg"
    monkeypatch.setenv("LUNGSEG_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("LUNGSEG_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("LUNGSEG_CHECKPOINT", str(tmp_path / "best.pt"))
    assert L.settings().data_dir == tmp_path / "d" and L.default_cache_dir() == tmp_path / "c"
    assert L.settings().checkpoint == tmp_path / "best.pt"


@pytest.mark.parametrize("value", ["lots", "-5", "0", "nan", "inf"])
def test_a_size_that_cannot_be_one_is_refused_naming_the_variable(monkeypatch, tmp_path, value):
    monkeypatch.setenv("LUNGSEG_MAX_MEGAPIXELS", value)
    with pytest.raises(L.LungsegConfigError, match="LUNGSEG_MAX_MEGAPIXELS"):
        L.predict_proba(L.build_model("resnet18", weights=None), np.zeros((64, 64), np.uint8))


def test_download_honours_the_data_folder_setting(monkeypatch, tmp_path, capsys):
    fetched = []
    monkeypatch.setattr(lungseg_io, "download_montgomery", lambda target: fetched.append(target) or target / "MontgomerySet")
    monkeypatch.setenv("LUNGSEG_DATA_DIR", str(tmp_path / "mine"))
    assert lungseg_io.main(["download", "--montgomery"]) == 0
    assert fetched == [tmp_path / "mine"]
    assert lungseg_io.main(["download", "--montgomery", "--target", str(tmp_path / "other")]) == 0
    assert fetched[-1] == tmp_path / "other"
