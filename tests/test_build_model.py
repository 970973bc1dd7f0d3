"""The U-Net and its weights: the architecture, the skip ablation, ImageNet weights from the cache, the hub
or local files, and the quick check whether the hub can be reached."""
from __future__ import annotations

import pathlib

import threading
import time
import warnings

import pytest
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import save_file

import lungseg_io
import lungseg_utils as L
from conftest import naming


def test_build_model_shapes_and_no_skip_variant():
    x = torch.randn(2, 3, 64, 64)
    model = L.build_model("resnet18", weights=None).eval()
    assert model(x).shape == (2, 1, 64, 64)
    no_skip = L.build_model("resnet18", weights=None, skip_connections=False).eval()
    assert L.count_parameters(no_skip) == L.count_parameters(model)
    features = no_skip.encoder(x)
    assert all((f == 0).all() for f in features[:-1]) and (features[-1] != 0).any()


# ---------------------------------------------------------------- ImageNet weights
def test_imagenet_offline_falls_back_fast_with_one_warning(monkeypatch):
    monkeypatch.setattr(lungseg_io, "cached_imagenet_state", lambda encoder: None)
    monkeypatch.setattr(lungseg_io, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(lungseg_io, "_warned_offline", False)
    started = time.perf_counter()
    with pytest.warns(UserWarning, match="random initialization"):
        model = L.build_model("resnet18", weights="imagenet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.build_model("resnet18", weights="imagenet")  # warned once only
    assert time.perf_counter() - started < 10
    assert model.lungseg_config["weights"] is None


def test_imagenet_weights_from_local_hugging_face_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    settings = smp.encoders.encoders["resnet18"]["pretrained_settings"]["imagenet"]
    reference = L.build_model("resnet18", weights=None).encoder.state_dict()
    snapshot = tmp_path / f"models--{settings['repo_id'].replace('/', '--')}" / "snapshots" / settings["revision"]
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(lungseg_io, "hub_reachable", lambda *a, **k: pytest.fail("must not go online"))
    model = L.build_model("resnet18", weights="imagenet")
    assert model.lungseg_config["weights"] == "imagenet (Hugging Face cache)"
    for key, value in reference.items():
        torch.testing.assert_close(model.encoder.state_dict()[key], value)


def test_weights_from_local_files(tmp_path):
    source = L.build_model("resnet18", weights=None)
    encoder_state = {k: v.contiguous() for k, v in source.encoder.state_dict().items()}
    save_file(encoder_state, str(tmp_path / "encoder.safetensors"))
    model = L.build_model("resnet18", weights=tmp_path / "encoder.safetensors")
    torch.testing.assert_close(model.encoder.conv1.weight, source.encoder.conv1.weight)
    torch.save(source.state_dict(), tmp_path / "whole.pth")
    model = L.build_model("resnet18", weights=tmp_path / "whole.pth")
    torch.testing.assert_close(model.decoder.state_dict(), source.decoder.state_dict())
    with pytest.raises(L.LungsegDataError, match=naming("encoder.safetensors", "do not fit")):
        L.build_model("resnet34", weights=tmp_path / "encoder.safetensors")


def test_imagenet_availability_follows_cache_and_hub(monkeypatch):
    monkeypatch.setattr(lungseg_io, "cached_imagenet_state", lambda encoder: None)
    monkeypatch.setattr(lungseg_io, "hub_reachable", lambda: False)
    assert L.imagenet_weights_available() is False
    monkeypatch.setattr(lungseg_io, "hub_reachable", lambda: True)
    assert L.imagenet_weights_available() is True


# ---------------------------------------------------------------- is the hub reachable?
def test_hub_unreachable_is_detected_quickly(monkeypatch):
    """HF_HUB_OFFLINE=1: the answer is False at once, without a name look-up or a connection."""
    network_calls = []

    def no_network(name):
        def refuse(*args, **kwargs):
            network_calls.append(name)
            pytest.fail(f"hub_reachable called socket.{name} with HF_HUB_OFFLINE=1")
        return refuse

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(lungseg_io.socket, "getaddrinfo", no_network("getaddrinfo"))
    monkeypatch.setattr(lungseg_io.socket, "create_connection", no_network("create_connection"))
    started = time.perf_counter()
    assert lungseg_io.hub_reachable() is False
    assert time.perf_counter() - started < 0.1
    assert network_calls == []


def test_hub_check_is_bounded_when_name_lookup_hangs(monkeypatch):
    """A resolver that never answers: hub_reachable gives up after its timeout, not after the resolver's."""
    lookups = []
    released = threading.Event()

    def hanging_lookup(*args, **kwargs):
        lookups.append(args[0])
        released.wait(30)  # released when the test ends, so no thread outlives it
        raise OSError("name lookup timed out")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(lungseg_io.socket, "getaddrinfo", hanging_lookup)
    monkeypatch.setattr(lungseg_io.socket, "create_connection", lambda *a, **k: pytest.fail("no address was found to connect to"))
    started = time.perf_counter()
    try:
        assert lungseg_io.hub_reachable(timeout=0.5) is False
        elapsed = time.perf_counter() - started
    finally:
        released.set()
    assert lookups == ["huggingface.co"], "the check must have tried the name look-up"
    assert 0.4 < elapsed < 3, f"gave up after {elapsed:.2f} s (timeout 0.5 s)"


def test_a_weights_file_holding_code_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1), "hook": pathlib.Path("anything")}, path)  # a Path pickles as code to run
    with pytest.raises(L.LungsegDataError, match="weights.pth") as refusal:
        L.build_model("resnet18", weights=path)
    assert "weights_only=False" not in str(refusal.value)
