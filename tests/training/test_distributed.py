"""A 2-process CPU run under torchrun (gloo): SSL on both ranks, the rest on rank 0, one valid repository."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from service.card import load_card  # noqa: E402
from training.data.phantoms import generate_dataset  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_two_processes_gloo(tmp_path: Path):
    data = generate_dataset(tmp_path / "phantoms", 64, seed=5, progress=False)
    out = tmp_path / "repo"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "training", "train", "--preset", "smoke", "--data", f"csv:{data}", "--device", "cpu",
        "--out", str(out), "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(2 process(es))" in proc.stdout
    card = load_card(out, verify=True)
    assert card.num_clusters == 4
