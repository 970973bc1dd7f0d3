"""The upload callback of chapter 05's widget, with a real X-ray, a corrupt file and DICOM."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

import lungseg_utils as L
from conftest import dicom_bytes


@pytest.fixture(scope="module")
def app(random_model):
    """The widget around the shared random model (the widget's state is this module's; the model is not changed)."""
    return L.SegmentationApp(random_model)


def test_real_xray_upload_gives_mask_area_and_download(app, real_xray):
    path = real_xray
    result = app.process(path.read_bytes(), path.name)
    gray = L.decode_image(path)
    assert result is not None and result["mask"].shape == gray.shape
    assert result["lung_pixels"] == int(result["mask"].sum())
    assert "lung area" in app.message.value and path.name in app.message.value
    assert app.download.value.startswith("<a download=") and "base64," in app.download.value
    decoded = cv2.imdecode(np.frombuffer(L.mask_png_bytes(result["mask"]), np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(decoded, result["mask"] * 255)


@pytest.mark.parametrize("data, reason", [(b"definitely not an image", "cannot be read as an image"), (b"", "upload is empty")])
def test_bad_upload_gives_message_not_traceback(app, data, reason):
    assert app.process(data, "broken.png") is None
    assert "Could not segment" in app.message.value and "broken.png" in app.message.value and reason in app.message.value
    assert app.download.value == ""


def test_dicom_upload(app):
    ramp = np.tile(np.arange(64) * 64, (64, 1))  # 12-bit values
    assert app.process(dicom_bytes(ramp, "MONOCHROME2"), "scan.dcm")["mask"].shape == (64, 64)
    assert app.process(b"DICM garbage", "bad.dcm") is None and "not a readable DICOM" in app.message.value


def test_app_shows_the_overlay_as_a_png_without_output_widgets(app, real_xray):
    """An Output widget makes nbclient send on the shell channel while it waits there (jupyter/nbclient#312)."""
    import ipywidgets as widgets

    def all_widgets(widget):
        yield widget
        for child in getattr(widget, "children", ()):
            yield from all_widgets(child)

    assert not any(isinstance(w, widgets.Output) for w in all_widgets(app.widget))
    path = real_xray
    result = app.process(path.read_bytes(), path.name)
    picture = cv2.imdecode(np.frombuffer(app.picture.value, np.uint8), cv2.IMREAD_COLOR)
    height, width = L.decode_image(path).shape
    scale = min(1.0, 512 / max(height, width))  # the picture is shown at most 512 px per side, the mask is full size
    assert picture.shape == (round(height * scale), round(width * scale), 3) and result["mask"].shape == (height, width)
    assert app.process(b"broken", "broken.png") is None and app.picture.value == b""


def test_every_lungseg_error_is_a_red_message_not_a_traceback(app, real_xray, monkeypatch):
    monkeypatch.setenv("LUNGSEG_MAX_MEGAPIXELS", "lots")  # a setting that cannot work, raised while decoding
    assert app.process(real_xray.read_bytes(), real_xray.name) is None
    assert "b00020" in app.message.value and "LUNGSEG_MAX_MEGAPIXELS" in app.message.value
