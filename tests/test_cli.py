"""The command line: a batch goes on past bad files, names each with its reason, and stays small in memory."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import lungseg_utils as L
from conftest import CLI, write_header_bomb



@pytest.fixture(scope="module")
def batch(tmp_path_factory, real_xray) -> tuple[Path, list[str]]:
    """A folder with one real X-ray and one file of each bad kind (names in the order given to the CLI)."""
    folder = tmp_path_factory.mktemp("batch")
    good = real_xray
    (folder / "good.png").write_bytes(good.read_bytes())
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image\n")
    write_header_bomb(folder / "bomb.png")
    cv2.imwrite(str(folder / "tiny.png"), np.zeros((16, 16), np.uint8))
    (folder / "afolder").mkdir()
    cv2.imwrite(str(folder / "later.png"), cv2.imread(str(good), cv2.IMREAD_GRAYSCALE))
    return folder, ["good.png", "empty.png", "text.png", "bomb.png", "tiny.png", "missing.png", "afolder", "later.png"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_batch_goes_on_names_every_failure_and_exits_non_zero(batch, tiny_checkpoint, real_xray):
    folder, names = batch
    result = run_cli("predict", *names, "--checkpoint", str(tiny_checkpoint), "--out", "out", cwd=folder)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    reasons = {
        "empty.png": "the file is empty",
        "text.png": "cannot be read as an image",
        "bomb.png": "over the limit",
        "tiny.png": "too small",
        "missing.png": "not found",
        "afolder": "is a folder",
    }
    failed_lines = [line for line in result.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed_lines) == len(reasons)
    for name, reason in reasons.items():
        assert any(line.startswith(f"FAILED {name}: ") and reason in line for line in failed_lines), name
    for name in ("good", "later"):
        written = cv2.imread(str(folder / "out" / f"{name}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert written is not None and written.shape == L.decode_image(real_xray).shape and set(np.unique(written)) <= {0, 255}
    assert re.fullmatch(r"2 done \([0-2] with warnings\), 6 failed, of 8 files; one row per file in out/predictions\.csv\.",
                        result.stdout.strip().splitlines()[-1])


def test_existing_masks_are_not_overwritten_without_force(batch, tiny_checkpoint, tmp_path):
    folder, _ = batch
    out = tmp_path / "out"
    args = ("predict", "good.png", "--checkpoint", str(tiny_checkpoint), "--out", str(out))
    assert run_cli(*args, cwd=folder).returncode == 0
    again = run_cli(*args, cwd=folder)
    assert again.returncode == 1 and "exists; pass --force" in again.stderr
    assert run_cli(*args, "--force", cwd=folder).returncode == 0


def test_peak_memory_of_a_batch_with_a_header_bomb(batch, tiny_checkpoint):
    """The CLI's own peak resident memory stays under 1.5 GB (measured by a fresh parent process)."""
    folder, names = batch
    measure = (
        "import json, resource, subprocess, sys\n"
        f"run = subprocess.run({[*CLI, 'predict', *names, '--checkpoint', str(tiny_checkpoint), '--out', 'mem-out']!r}, "
        "capture_output=True, text=True)\n"
        "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, run.stdout]))\n"
    )
    result = subprocess.run([sys.executable, "-c", measure], cwd=folder, capture_output=True, text=True, timeout=300)
    peak_kib, cli_output = json.loads(result.stdout)
    assert "2 done" in cli_output and "6 failed" in cli_output, "the whole batch ran, the bomb included"
    print(f"peak resident memory of the CLI: {peak_kib / 1024:.0f} MiB")
    assert 100_000 < peak_kib < 1.5e9 / 1024, f"peak {peak_kib / 1024:.0f} MiB"


@pytest.mark.parametrize("content, reason", [(b"hello", "not a PyTorch checkpoint"), (b"", "the file is empty")])
def test_bad_checkpoint_is_one_line_and_exit_1(batch, tmp_path, content, reason):
    folder, _ = batch
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    result = run_cli("predict", "good.png", "--checkpoint", str(bad), "--out", "never", cwd=folder)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.pt" in lines[0] and reason in lines[0]
    assert not (folder / "never").exists()


def test_help_lists_the_formats():
    help_text = subprocess.run([*CLI, "predict", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--checkpoint" in help_text and "DICOM" in help_text
