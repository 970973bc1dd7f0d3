"""Environment variables: read in one place (settings()), one rule for "true", clear errors for values that cannot work;
and what the machine decides: the device, the precision (GPU capability, the CPU's bf16), seeding, the printed configuration."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

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
def test_a_size_that_cannot_be_one_is_refused_naming_the_variable(monkeypatch, random_model, value):
    monkeypatch.setenv("LUNGSEG_MAX_MEGAPIXELS", value)
    with pytest.raises(L.LungsegConfigError, match="LUNGSEG_MAX_MEGAPIXELS"):
        L.predict_proba(random_model, np.zeros((64, 64), np.uint8))


def test_download_honours_the_data_folder_setting(monkeypatch, tmp_path, capsys):
    fetched = []
    monkeypatch.setattr(lungseg_io, "download_montgomery", lambda target: fetched.append(target) or target / "MontgomerySet")
    monkeypatch.setenv("LUNGSEG_DATA_DIR", str(tmp_path / "mine"))
    assert lungseg_io.main(["download", "--montgomery"]) == 0
    assert fetched == [tmp_path / "mine"]
    assert lungseg_io.main(["download", "--montgomery", "--target", str(tmp_path / "other")]) == 0
    assert fetched[-1] == tmp_path / "other"


# ---------------------------------------------------------------- device, precision, seeding and the printed configuration
@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_gpu_precision_follows_compute_capability(monkeypatch, capability, expected):
    """A T4 (7.5) or V100 (7.0) gets fp16, whatever is_bf16_supported() claims; Ampere (8.0) and newer get bf16."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert L.autocast_dtype(torch.device("cuda")) == expected


def test_seeding_asks_cudnn_for_repeatable_algorithms(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    L.seed_everything(1)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


@pytest.mark.parametrize("flags, native", [("fpu avx avx2", False), ("avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16 amx_tile", True)])
def test_cpu_bf16_only_where_native(tmp_path, monkeypatch, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert L.cpu_has_native_bf16(cpuinfo) is native
    monkeypatch.setattr(L, "cpu_has_native_bf16", lambda: native)
    assert L.autocast_dtype(torch.device("cpu")) == (torch.bfloat16 if native else None)
    assert L.autocast_dtype(torch.device("mps")) is None


def test_missing_cpuinfo_means_fp32(tmp_path):
    assert L.cpu_has_native_bf16(tmp_path / "no-such-file") is False


def test_print_config_names_versions_and_device(capsys):
    L.print_config(torch.device("cpu"))
    out = capsys.readouterr().out
    for part in (f"torch {torch.__version__}", f"segmentation_models_pytorch {smp.__version__}", "albumentations ", "numpy ", "python ", "device: cpu"):
        assert part in out, part


def test_cpu_model_name_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9999 16-Core Processor\nflags\t\t: avx2\n")
    assert L.cpu_model_name(cpuinfo) == "AMD EPYC 9999 16-Core Processor"
    assert L.cpu_model_name(tmp_path / "missing") == (platform.processor() or platform.machine())  # what platform knows


def test_kaggle_credentials_are_found_where_kagglehub_looks(monkeypatch, tmp_path):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    assert L.settings().kaggle_credentials is False
    monkeypatch.setenv("KAGGLE_USERNAME", "learner")
    assert L.settings().kaggle_credentials is False, "a user name alone is no credential"
    monkeypatch.setenv("KAGGLE_KEY", "key")
    assert L.settings().kaggle_credentials is True
    monkeypatch.delenv("KAGGLE_USERNAME")
    (tmp_path / "kaggle.json").write_text('{"username": "learner", "key": "key"}')
    assert L.settings().kaggle_credentials is True
