"""The one decoder: every format and bit depth, and a clear message for each kind of bad input."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

import lungseg_utils as L
from conftest import dicom_bytes, lung_mask, naming, write_header_bomb


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    return write_header_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


def ramp(height: int = 64, width: int = 80) -> np.ndarray:
    return np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))


# ---------------------------------------------------------------- formats
@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".jpg"])
def test_8bit_gray_formats(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    Image.fromarray(ramp()).save(path)
    image = L.decode_image(path)
    assert image.dtype == np.uint8 and image.shape == (64, 80)
    tolerance = 3 if suffix == ".jpg" else 0
    assert np.abs(image.astype(int) - ramp()).max() <= tolerance


def test_16bit_png_and_tiff_are_rescaled_to_8bit(tmp_path):
    values = np.tile(np.arange(80, dtype=np.uint16) * 700 + 1000, (64, 1))
    for suffix in (".png", ".tif"):
        path = tmp_path / f"x16{suffix}"
        Image.fromarray(values).save(path)
        image = L.decode_image(path)
        expected = np.round((values - 1000) / (79 * 700) * 255).astype(np.uint8)
        assert image.dtype == np.uint8 and np.abs(image.astype(int) - expected).max() <= 1, suffix


def test_rgb_rgba_palette_and_1bit(tmp_path):
    gray = ramp()
    Image.fromarray(np.dstack([gray] * 3)).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([gray] * 3 + [np.zeros_like(gray)])).save(tmp_path / "rgba.png")
    Image.fromarray(gray).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(gray > 127).save(tmp_path / "onebit.png")
    for name in ("rgb", "rgba", "palette"):
        image = L.decode_image(tmp_path / f"{name}.png")
        assert image.shape == gray.shape and np.abs(image.astype(int) - gray).max() <= 1, name
    np.testing.assert_array_equal(L.decode_image(tmp_path / "onebit.png"), (gray > 127) * 255)


def test_bytes_decode_like_the_file(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(ramp()).save(path)
    np.testing.assert_array_equal(L.decode_image(path.read_bytes(), "upload.png"), L.decode_image(path))


def test_real_xray_decodes_as_opencv_reads_it(real_xray):
    path = real_xray
    reference = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(L.decode_image(path), reference)


# ---------------------------------------------------------------- DICOM
def test_dicom_monochrome1_is_inverted(tmp_path):
    values = np.tile(np.arange(64) * 64, (64, 1))  # 12-bit
    normal = L.decode_image(dicom_bytes(values, "MONOCHROME2"), "x.dcm")
    inverted = L.decode_image(dicom_bytes(values, "MONOCHROME1"), "x.dcm")
    assert normal.dtype == np.uint8 and normal[0, 0] == 0 and normal[0, -1] == 255
    np.testing.assert_array_equal(inverted, 255 - normal)
    (tmp_path / "noext").write_bytes(dicom_bytes(values))  # recognised by its preamble, not its name
    np.testing.assert_array_equal(L.decode_image(tmp_path / "noext"), normal)


def test_dicom_window_is_applied():
    values = np.tile(np.arange(64) * 64, (64, 1))  # 0 .. 4032
    image = L.decode_image(dicom_bytes(values, WindowCenter=1000, WindowWidth=500), "w.dcm")
    column = image[0]
    assert (column[values[0] <= 700] == 0).all() and (column[values[0] >= 1300] == 255).all()
    assert 100 < column[np.argmin(abs(values[0] - 1000))] < 155, "the window's centre maps to mid-gray"


def test_dicom_rescale_slope_and_intercept_are_applied():
    values = np.tile(np.arange(64) * 64, (64, 1))
    plain = L.decode_image(dicom_bytes(values), "a.dcm")
    rescaled = L.decode_image(dicom_bytes(values, RescaleSlope=-1, RescaleIntercept=4095), "b.dcm")
    np.testing.assert_array_equal(rescaled, 255 - plain)


def test_bad_and_huge_dicom_are_refused():
    with pytest.raises(L.LungsegDataError, match=naming("bad.dcm", "DICOM")):
        L.decode_image(b"\0" * 128 + b"DICM" + b"garbage", "bad.dcm")
    huge = dicom_bytes(np.zeros((40, 40)), Rows=20000, Columns=20000)
    with pytest.raises(L.LungsegDataError, match=naming("huge.dcm", "over the limit")):
        L.decode_image(huge, "huge.dcm")


# ---------------------------------------------------------------- bad input
def test_missing_folder_empty_and_text(tmp_path):
    with pytest.raises(L.LungsegDataError, match=naming("nothere.png", "not found")):
        L.decode_image(tmp_path / "nothere.png")
    with pytest.raises(L.LungsegDataError, match=naming(tmp_path, "is a folder")):
        L.decode_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(L.LungsegDataError, match=naming("empty.png", "is empty")):
        L.decode_image(tmp_path / "empty.png")
    (tmp_path / "notes.png").write_text("this is a text file\n")
    with pytest.raises(L.LungsegDataError, match=naming("notes.png", "cannot be read")):
        L.decode_image(tmp_path / "notes.png")
    with pytest.raises(L.LungsegDataError, match=naming("upload.png", "is empty")):
        L.decode_image(b"", "upload.png")


def test_truncated_png_is_named(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray((np.random.default_rng(0).random((256, 256)) * 255).astype(np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(L.LungsegDataError, match=naming("cut.png", "truncated")):
        L.decode_image(path)


def test_header_bomb_is_refused_before_decoding(bomb):
    assert bomb.stat().st_size < 200_000
    with pytest.raises(L.LungsegDataError, match=naming(bomb, "over the limit")):
        L.decode_image(bomb)
    with pytest.raises(L.LungsegDataError, match=naming(bomb, "over the limit")):
        L.image_size_of(bomb)


def test_limit_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    Image.fromarray(ramp(400, 500)).save(path)
    monkeypatch.setenv("LUNGSEG_MAX_MEGAPIXELS", "0.1")
    with pytest.raises(L.LungsegDataError, match=naming(path, "LUNGSEG_MAX_MEGAPIXELS")):
        L.decode_image(path)
    assert L.decode_image(path, max_pixels=300_000).shape == (400, 500)


def test_tiny_image_is_refused(tmp_path):
    Image.fromarray(np.zeros((16, 40), np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(L.LungsegDataError, match=naming("tiny.png", "too small")):
        L.decode_image(tmp_path / "tiny.png")


def test_bad_files_print_nothing(tmp_path, capfd):
    """No OpenCV or libpng warning lines reach the user: only the exception speaks."""
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(cv2.imencode(".png", lung_mask(128))[1].tobytes()[:300])
    for name in ("text.png", "cut.png", "missing.png"):
        with pytest.raises(L.LungsegDataError):
            L.decode_image(tmp_path / name)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_the_image_limit_never_exceeds_pillows_own(monkeypatch):
    monkeypatch.setenv("LUNGSEG_MAX_MEGAPIXELS", "500")
    assert L.max_image_pixels() == Image.MAX_IMAGE_PIXELS
    monkeypatch.setenv("LUNGSEG_MAX_MEGAPIXELS", "0.5")
    assert L.max_image_pixels() == 500_000
