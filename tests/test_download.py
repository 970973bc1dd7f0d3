"""The download helpers against a real HTTP server on 127.0.0.1, including a hostile zip."""
from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

import lungseg_io
import lungseg_utils as L
from conftest import find_test_data, lung_mask, naming, write_kaggle_layout


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        CountingHandler.requests.append(self.path)
        if self.path.startswith("/cut/"):  # the connection drops halfway through the file
            body = (Path(self.directory) / self.path.removeprefix("/cut/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
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
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    httpd.shutdown()
    httpd.server_close()


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
    set_dir = L.download_montgomery(target, urls=[f"{url}/MontgomerySet.zip"], expected_size=size, expected_images=2)
    assert set_dir == target / "MontgomerySet"
    table = L.build_pairs_table(target)
    assert len(table) == 2 and table.labeled.all() and all(len(m) == 2 for m in table.mask_paths)
    _, mask = L.read_pair(table.image_path[0], table.mask_paths[0])
    np.testing.assert_array_equal(mask, lung_mask(64) // 255)
    assert not (target / "MontgomerySet.zip").exists(), "the archive is removed after extraction"
    L.download_montgomery(target, urls=[f"{url}/MontgomerySet.zip"], expected_images=2)
    assert CountingHandler.requests == ["/MontgomerySet.zip"], "second call must not download again"


def test_download_file_verifies_size_and_checksum(server, tmp_path):
    url, www = server
    (www / "blob.bin").write_bytes(b"x" * 1000)
    good = hashlib.sha256(b"x" * 1000).hexdigest()
    path = L.download_file(f"{url}/blob.bin", tmp_path / "blob.bin", expected_size=1000, sha256=good)
    assert path.read_bytes() == b"x" * 1000
    with pytest.raises(L.LungsegDataError, match=naming("blob.bin", "incomplete or corrupt")):
        L.download_file(f"{url}/blob.bin", tmp_path / "other.bin", expected_size=999)
    assert not (tmp_path / "other.bin").exists() and not (tmp_path / "other.bin.part").exists()
    with pytest.raises(L.LungsegDataError, match=naming("blob.bin", "incomplete or corrupt")):
        L.download_file(f"{url}/blob.bin", tmp_path / "third.bin", sha256="0" * 64)
    assert not (tmp_path / "third.bin").exists() and not (tmp_path / "third.bin.part").exists()


@pytest.mark.parametrize("member", ["../escape.txt", "/abs/escape.txt", "MontgomerySet/../../escape.txt"])
def test_hostile_zip_is_refused_and_writes_nothing(server, tmp_path, member):
    url, www = server
    with zipfile.ZipFile(www / "MontgomerySet.zip", "w") as zf:
        zf.writestr("MontgomerySet/CXR_png/ok.png", b"fine")
        zf.writestr(member, b"owned")
    target = tmp_path / "deep" / "data"
    with pytest.raises(L.LungsegDataError, match=naming("MontgomerySet.zip", "Refusing")):
        L.download_montgomery(target, urls=[f"{url}/MontgomerySet.zip"], expected_images=None)
    assert not list(tmp_path.rglob("escape.txt"))
    assert not (target / "MontgomerySet").exists(), "nothing is extracted from a hostile archive"
    assert not (target / "MontgomerySet.zip").exists(), "the refused archive is deleted"


def test_zip_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("MontgomerySet/link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(L.LungsegDataError, match=naming(archive, "is a link")):
        L.safe_extract(archive, tmp_path / "out")


def without_kaggle_credentials(monkeypatch, tmp_path) -> None:
    """No Kaggle token anywhere: not in the environment, not in the Kaggle config folder."""
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle-config"))


def test_ensure_data_falls_back_to_montgomery_when_kaggle_fails(server, tmp_path, monkeypatch, capsys):
    url, www = server
    montgomery_zip(www / "MontgomerySet.zip")

    def refused(target=None):
        raise L.LungsegDataError("Download from Kaggle failed (403 Forbidden).")

    monkeypatch.setenv("KAGGLE_USERNAME", "learner")
    monkeypatch.setenv("KAGGLE_KEY", "a-key-kaggle-refuses")
    monkeypatch.setattr(lungseg_io, "download_kaggle", refused)
    data_dir = L.ensure_data(tmp_path / "data", urls=[f"{url}/MontgomerySet.zip"], expected_images=2)
    assert data_dir == tmp_path / "data" / "MontgomerySet"
    said = capsys.readouterr().out
    assert "403 Forbidden" in said and "Downloading the NLM Montgomery set instead" in said
    description = L.describe_data(L.build_pairs_table(tmp_path / "data"))
    assert description == "data: the NLM Montgomery set only (one hospital): 2 X-rays, 2 with lung masks (2 Montgomery), 0 unlabeled"


def test_ensure_data_gives_clear_error_when_every_download_fails(tmp_path, monkeypatch):
    def no_internet(target=None):
        raise L.LungsegDataError("Download from Kaggle failed (network unreachable).")

    monkeypatch.setenv("KAGGLE_API_TOKEN", "a-token")
    monkeypatch.setattr(lungseg_io, "download_kaggle", no_internet)
    with pytest.raises(L.LungsegDataError, match=naming("LUNGSEG_DATA_DIR", "network unreachable")):
        L.ensure_data(tmp_path / "empty", urls=["http://127.0.0.1:9/MontgomerySet.zip"], timeout=2)


def test_describe_data_of_the_kaggle_set(kaggle_data_dir):
    assert L.describe_data(L.build_pairs_table(kaggle_data_dir)) == (
        "data: Chest X-Ray Masks and Labels: 800 X-rays, 704 with lung masks (138 Montgomery, 566 Shenzhen), 96 unlabeled")


def test_archive_that_fails_its_check_is_deleted_and_the_next_call_downloads_again(server, tmp_path):
    url, www = server
    (www / "MontgomerySet.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    target = tmp_path / "data"
    with pytest.raises(L.LungsegDataError, match=naming("MontgomerySet.zip", "not a readable zip")):
        L.download_montgomery(target, urls=[f"{url}/MontgomerySet.zip"], expected_images=2)
    assert not (target / "MontgomerySet.zip").exists() and not (target / "MontgomerySet").exists()
    montgomery_zip(www / "MontgomerySet.zip")  # the server now has the real file
    assert L.download_montgomery(target, urls=[f"{url}/MontgomerySet.zip"], expected_images=2) == target / "MontgomerySet"
    assert CountingHandler.requests == ["/MontgomerySet.zip", "/MontgomerySet.zip"]


def test_recorded_checksum_is_enforced(server, tmp_path):
    url, www = server
    montgomery_zip(www / "MontgomerySet.zip")
    good = hashlib.sha256((www / "MontgomerySet.zip").read_bytes()).hexdigest()
    with pytest.raises(L.LungsegDataError, match=naming("MontgomerySet.zip", "incomplete or corrupt")):
        L.download_montgomery(tmp_path / "data", urls=[f"{url}/MontgomerySet.zip"], sha256="0" * 64, expected_images=2)
    assert not (tmp_path / "data" / "MontgomerySet.zip").exists()
    L.download_montgomery(tmp_path / "data", urls=[f"{url}/MontgomerySet.zip"], sha256=good, expected_images=2)


def test_archive_with_the_wrong_content_is_refused(server, tmp_path):
    url, www = server
    montgomery_zip(www / "MontgomerySet.zip")
    target = tmp_path / "data"
    with pytest.raises(L.LungsegDataError, match=naming("MontgomerySet", "expected 138")):
        L.download_montgomery(target, urls=[f"{url}/MontgomerySet.zip"])
    assert not (target / "MontgomerySet").exists() and not (target / "MontgomerySet.zip").exists()


def test_a_second_address_is_tried_when_the_first_fails(server, tmp_path):
    url, www = server
    montgomery_zip(www / "MontgomerySet.zip")
    urls = [f"{url}/moved/MontgomerySet.zip", f"{url}/MontgomerySet.zip"]
    assert L.download_montgomery(tmp_path / "data", urls=urls, expected_images=2).is_dir()
    assert CountingHandler.requests == ["/moved/MontgomerySet.zip", "/MontgomerySet.zip"]


def test_interrupted_extraction_never_looks_complete(tmp_path, monkeypatch):
    archive = tmp_path / "MontgomerySet.zip"
    montgomery_zip(archive)
    target = tmp_path / "data"
    original = zipfile.ZipFile._extract_member  # what extractall calls for each member

    def extract_one_then_die(self, member, targetpath, pwd):
        if any(Path(targetpath).rglob("*.png")):
            raise KeyboardInterrupt
        return original(self, member, targetpath, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "_extract_member", extract_one_then_die)
    with pytest.raises(KeyboardInterrupt):
        L.safe_extract(archive, target)
    assert not (target / "MontgomerySet").exists() and not list(target.glob(".extracting-*"))
    monkeypatch.setattr(zipfile.ZipFile, "_extract_member", original)
    # a run killed outright leaves its hidden staging folder: it is never taken for data, and is cleaned next time
    stale = target / ".extracting-killed" / "MontgomerySet" / "CXR_png"
    stale.mkdir(parents=True)
    (stale / "MCUCXR_0000_0.png").write_bytes(png_bytes(np.zeros((64, 64), np.uint8)))
    with pytest.raises(L.LungsegDataError, match=naming(target, "No chest X-rays")):
        L.find_data_dir(target)
    L.safe_extract(archive, target)
    assert not (target / ".extracting-killed").exists() and len(L.build_pairs_table(target)) == 2


def test_zip_bomb_is_refused_by_the_size_cap(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("MontgomerySet/CXR_png/huge.png", b"\0" * (20 * 2**20))
    assert archive.stat().st_size < 100_000
    with pytest.raises(L.LungsegDataError, match=naming(archive, "over the cap")):
        L.safe_extract(archive, tmp_path / "out", max_bytes=2**20)
    assert not (tmp_path / "out" / "MontgomerySet").exists()


def test_existing_folders_are_never_overwritten_by_extraction(tmp_path):
    archive = tmp_path / "MontgomerySet.zip"
    montgomery_zip(archive)
    mine = tmp_path / "data" / "MontgomerySet"
    mine.mkdir(parents=True)
    (mine / "my-notes.txt").write_text("keep me")
    with pytest.raises(L.LungsegDataError, match=naming(mine, "never overwritten")):
        L.safe_extract(archive, tmp_path / "data")
    assert (mine / "my-notes.txt").read_text() == "keep me"


def test_kaggle_set_is_preferred_over_the_nlm_montgomery_set(tmp_path, capsys):
    data = tmp_path / "data"
    kaggle = write_kaggle_layout(data / "chest-xray-masks-and-labels")
    L.safe_extract(_zip_in(tmp_path), data)
    L._announced_choices.clear()
    assert L.find_data_dir(data) == kaggle
    said = capsys.readouterr().out
    assert "using the Kaggle set" in said and "MontgomerySet" in said
    assert L.find_data_dir(data) == kaggle and capsys.readouterr().out == "", "said once"
    assert len(L.build_pairs_table(data)) == 9, "all Kaggle images, not the 2 of the NLM set"
    write_kaggle_layout(data / "second-copy")
    with pytest.raises(L.LungsegDataError, match=naming("chest-xray-masks-and-labels", "second-copy")):
        L.find_data_dir(data)


def _zip_in(folder: Path) -> Path:
    archive = folder / "MontgomerySet.zip"
    montgomery_zip(archive)
    return archive


def test_a_fresh_machine_fetches_the_montgomery_set_for_the_tests_and_says_so(server, tmp_path, monkeypatch, capsys):
    """No LUNGSEG_DATA_DIR, no shared copy, an empty data/ and no Kaggle credentials: make test fetches and goes on."""
    url, www = server
    montgomery_zip(www / "MontgomerySet.zip")
    monkeypatch.delenv("LUNGSEG_DATA_DIR", raising=False)
    monkeypatch.setattr(L, "REPO_DIR", tmp_path / "fresh-clone")
    without_kaggle_credentials(monkeypatch, tmp_path)
    monkeypatch.setattr(lungseg_io, "download_kaggle", lambda target=None: pytest.fail("Kaggle needs credentials"))
    options = dict(shared_copy=tmp_path / "no-shared-copy", urls=[f"{url}/MontgomerySet.zip"], expected_images=2)
    data_dir = find_test_data(**options)
    assert data_dir == tmp_path / "fresh-clone" / "data" / "MontgomerySet"
    said = capsys.readouterr().out
    assert "no Kaggle credentials" in said and f"Fetched the NLM Montgomery set into {data_dir}" in said
    assert set(L.build_pairs_table(data_dir).source) == {"Montgomery"}
    assert find_test_data(**options) == data_dir and CountingHandler.requests == ["/MontgomerySet.zip"], "fetched once"


def test_an_interrupted_download_tries_the_next_address_and_says_so(server, tmp_path):
    url, www = server
    montgomery_zip(www / "MontgomerySet.zip")
    with pytest.raises(L.LungsegDataError, match=naming("MontgomerySet.zip", "interrupted")):
        L.download_file(f"{url}/cut/MontgomerySet.zip", tmp_path / "one" / "MontgomerySet.zip")
    assert not list((tmp_path / "one").iterdir()), "no partial file is left"
    urls = [f"{url}/cut/MontgomerySet.zip", f"{url}/MontgomerySet.zip"]
    assert L.download_montgomery(tmp_path / "two", urls=urls, expected_images=2) == tmp_path / "two" / "MontgomerySet"
    assert CountingHandler.requests[-2:] == ["/cut/MontgomerySet.zip", "/MontgomerySet.zip"]
