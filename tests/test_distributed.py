"""train() under torchrun: two CPU processes (gloo) give the run of one process, within tolerance."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import lungseg_utils as L

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import torch
import lungseg_utils as L
from conftest import tiny_arrays, tiny_config
result = L.train(tiny_arrays(16), tiny_arrays(6, seed=1), sys.argv[1], tiny_config(epochs=3, batch_size=4, opacity_p=0.0))
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
print("RESULT", json.dumps(dict(rank=rank, val_loss=list(result.history.val_loss), val_dice=list(result.history.val_dice))))
"""


def _run(tmp_path: Path, run_dir: Path, processes: int) -> list[dict]:
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests")))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([*launcher, str(script), str(run_dir)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line.split("RESULT", 1)[1]) for line in done.stdout.splitlines() if line.startswith("RESULT")]


def test_two_processes_train_like_one(tmp_path):
    one = _run(tmp_path, tmp_path / "one", 1)
    two = _run(tmp_path, tmp_path / "two", 2)
    assert sorted(r["rank"] for r in two) == [0, 1]
    assert two[0]["val_loss"] == two[1]["val_loss"]  # metrics are reduced across processes: every rank decides alike
    assert len(two[0]["val_loss"]) == len(one[0]["val_loss"]) == 3
    assert abs(two[0]["val_loss"][0] - one[0]["val_loss"][0]) < 0.03  # after the same four global batches
    assert abs(two[0]["val_dice"][-1] - one[0]["val_dice"][-1]) < 0.1
    assert abs(two[0]["val_loss"][-1] - one[0]["val_loss"][-1]) < 0.15
    # one writer: rank 0's files, complete, and nothing half-written
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(L.RUN_FILES)
    assert len(pd.read_csv(tmp_path / "two" / "history.csv")) == 3
    L.load_checkpoint(tmp_path / "two" / "best.pt")


def test_batch_that_does_not_divide_among_processes_is_clear(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(L.LungsegConfigError, match="multiple of 3"):
        L.start_distributed(L.TrainConfig(batch_size=8))
