"""The download helpers against a real HTTP server on 127.0.0.1, including a hostile zip."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import threading
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

import lungseg_utils as L
from conftest import lung_mask


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        CountingHandler.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1; yields (base_url, folder)."""
    www = tmp_path / "www"
    www.mkdir()
    CountingHandler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    httpd.shutdown()


def png_bytes(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def montgomery_zip(path: Path) -> None:
    """A two-image zip in the NLM Montgomery layout (left and right masks apart)."""
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(2):
            name = f"MCUCXR_{i:04d}_{i}.png"
            both = lung_mask(64)
            left, right = both.copy(), both.copy()
            left[:, 32:], right[:, :32] = 0, 0
            zf.writestr(f"MontgomerySet/CXR_png/{name}", png_bytes(np.full((64, 64), 120, np.uint8)))
            zf.writestr(f"MontgomerySet/ManualMask/leftMask/{name}", png_bytes(left))
            zf.writestr(f"MontgomerySet/ManualMask/rightMask/{name}", png_bytes(right))


def test_download_montgomery_extracts_pairs_and_skips_when_present(server, tmp_path):
    url, www = server
    montgomery_zip(www / "MontgomerySet.zip")
    size = (www / "MontgomerySet.zip").stat().st_size
    target = tmp_path / "data"
    set_dir = L.download_montgomery(target, url=f"{url}/MontgomerySet.zip", expected_size=size)
    assert set_dir == target / "MontgomerySet"
    table = L.build_pairs_table(target)
    assert len(table) == 2 and table.labeled.all() and all(len(m) == 2 for m in table.mask_paths)
    _, mask = L.read_pair(table.image_path[0], table.mask_paths[0])
    np.testing.assert_array_equal(mask, lung_mask(64) // 255)
    assert not (target / "MontgomerySet.zip").exists(), "the archive is removed after extraction"
    L.download_montgomery(target, url=f"{url}/MontgomerySet.zip")
    assert CountingHandler.requests == ["/MontgomerySet.zip"], "second call must not download again"


def test_download_file_verifies_size_and_checksum(server, tmp_path):
    url, www = server
    (www / "blob.bin").write_bytes(b"x" * 1000)
    good = hashlib.sha256(b"x" * 1000).hexdigest()
    path = L.download_file(f"{url}/blob.bin", tmp_path / "blob.bin", expected_size=1000, sha256=good)
    assert path.read_bytes() == b"x" * 1000
    with pytest.raises(L.LungsegDataError, match="incomplete or corrupt"):
        L.download_file(f"{url}/blob.bin", tmp_path / "other.bin", expected_size=999)
    assert not (tmp_path / "other.bin").exists() and not (tmp_path / "other.bin.part").exists()
    with pytest.raises(L.LungsegDataError, match="incomplete or corrupt"):
        L.download_file(f"{url}/blob.bin", tmp_path / "third.bin", sha256="0" * 64)


@pytest.mark.parametrize("member", ["../escape.txt", "/abs/escape.txt", "MontgomerySet/../../escape.txt"])
def test_hostile_zip_is_refused_and_writes_nothing(server, tmp_path, member):
    url, www = server
    with zipfile.ZipFile(www / "MontgomerySet.zip", "w") as zf:
        zf.writestr("MontgomerySet/CXR_png/ok.png", b"fine")
        zf.writestr(member, b"owned")
    target = tmp_path / "deep" / "data"
    with pytest.raises(L.LungsegDataError, match="Refusing to extract"):
        L.download_montgomery(target, url=f"{url}/MontgomerySet.zip")
    assert not list(tmp_path.rglob("escape.txt"))
    assert not (target / "MontgomerySet").exists(), "nothing is extracted from a hostile archive"


def test_zip_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("MontgomerySet/link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(L.LungsegDataError, match="is a link"):
        L.safe_extract(archive, tmp_path / "out")


def test_ensure_data_gives_clear_error_when_download_fails(tmp_path, monkeypatch):
    def no_internet(target=None):
        raise OSError("network unreachable")

    monkeypatch.setattr(L, "download_kaggle", no_internet)
    with pytest.raises(L.LungsegDataError, match="(?s)Download failed.*LUNGSEG_DATA_DIR"):
        L.ensure_data(tmp_path / "empty")
