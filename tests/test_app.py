"""The upload callback of chapter 05's widget, with a real X-ray, a corrupt file and DICOM."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest

import lungseg_utils as L


@pytest.fixture(scope="module")
def app():
    model = L.build_model("resnet18", weights=None).eval()
    model.lungseg_config["image_size"] = 64
    return L.SegmentationApp(model)


def dicom_bytes(pixels: np.ndarray, photometric: str) -> bytes:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def test_real_xray_upload_gives_mask_area_and_download(app, real_data_dir):
    path = next((real_data_dir / "Lung Segmentation" / "CXR_png").glob("MCUCXR_*.png"))
    result = app.process(path.read_bytes(), path.name)
    gray = L.read_xray(path)
    assert result is not None and result["mask"].shape == gray.shape
    assert result["lung_pixels"] == int(result["mask"].sum())
    assert "lung area" in app.message.value and path.name in app.message.value
    assert app.download.value.startswith("<a download=") and "base64," in app.download.value
    decoded = cv2.imdecode(np.frombuffer(L.mask_png_bytes(result["mask"]), np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(decoded, result["mask"] * 255)


def test_corrupt_upload_gives_message_not_traceback(app):
    assert app.process(b"definitely not an image", "broken.png") is None
    assert "Could not segment" in app.message.value and "broken.png" in app.message.value
    assert app.download.value == ""


def test_dicom_upload_16bit_and_monochrome1(app):
    ramp = np.tile(np.arange(64) * 64, (64, 1))  # 12-bit values
    normal = L.decode_upload(dicom_bytes(ramp, "MONOCHROME2"), "x.dcm")
    inverted = L.decode_upload(dicom_bytes(ramp, "MONOCHROME1"), "x.dcm")
    assert normal.dtype == np.uint8 and normal[0, 0] == 0 and normal[0, -1] == 255
    np.testing.assert_array_equal(inverted, 255 - normal)
    assert app.process(dicom_bytes(ramp, "MONOCHROME2"), "scan.dcm")["mask"].shape == (64, 64)
    assert app.process(b"DICM garbage", "bad.dcm") is None and "not a readable DICOM" in app.message.value
