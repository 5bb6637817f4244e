"""Per-stage checkpoints and resumable runs: a run stopped after a stage and resumed ends exactly as an
uninterrupted one; a resume with another configuration or other images is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.config import build_config  # noqa: E402
from training.phantoms import generate_dataset  # noqa: E402
from training.run import Checkpoints, RunStopped, check_resumable, config_differences, run  # noqa: E402


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    generate_dataset(root, 40, seed=5, progress=False)
    return root


def _cfg(phantom_dir, cache, **extra):
    return build_config(
        "smoke",
        data=[f"csv:{phantom_dir}"],
        test_fraction=0.25,
        cache_dir=cache,
        threads=1,
        cluster={"overcluster": 8},
        # Every image passes the threshold, so self-labeling trains on strong augmentations: it draws from
        # the global random state that the cluster stage left, which a resumed run must restore.
        selflabel={"threshold": 0.0},
        **extra,
    )


def test_stopped_and_resumed_run_equals_uninterrupted(phantom_dir, tmp_path, capsys):
    cfg = _cfg(phantom_dir, tmp_path / "cache")
    whole = run(cfg, tmp_path / "a" / "repo", tmp_path / "a" / "run", report=False)

    run_b, out_b = tmp_path / "b" / "run", tmp_path / "b" / "repo"
    with pytest.raises(RunStopped, match="--resume"):
        run(cfg, out_b, run_b, stop_after="cluster", report=False)
    ckpts = run_b / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["cluster.pt", "ssl.pt"]
    assert not (run_b / "summary.json").exists() and not out_b.exists()

    capsys.readouterr()
    resumed = run(cfg, out_b, run_b, resume=True, report=False)
    log = capsys.readouterr().out
    assert "ssl: resumed" in log and "cluster: resumed" in log and "selflabel: resumed" not in log
    assert sorted(p.name for p in ckpts.glob("*.pt")) == [
        "cluster.pt",
        "overcluster.pt",
        "selflabel.pt",
        "ssl.pt",
    ]

    # Same embeddings, probabilities, over-clustering and metrics, bit for bit; the same exported head.
    a, b = np.load(tmp_path / "a" / "run" / "outputs.npz"), np.load(run_b / "outputs.npz")
    assert a.files == b.files and "overcluster" in a.files
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert resumed["quality"] == whole["quality"]
    card_a = json.loads((tmp_path / "a" / "repo" / "model_card.json").read_text())
    card_b = json.loads((out_b / "model_card.json").read_text())
    assert card_a["head"]["sha256"] == card_b["head"]["sha256"]


def test_resume_refuses_another_configuration(phantom_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _cfg(phantom_dir, tmp_path / "cache")
    with pytest.raises(SystemExit, match="no run to resume"):
        check_resumable(cfg, run_dir)
    run_dir.mkdir()
    (run_dir / "config.json").write_text(cfg.model_dump_json())
    check_resumable(cfg, run_dir)  # same configuration: accepted
    check_resumable(cfg.model_copy(update={"threads": 2}), run_dir)  # thread count does not change results
    other = cfg.model_copy(update={"ssl": cfg.ssl.model_copy(update={"epochs": 3})})
    with pytest.raises(SystemExit, match=r"ssl\.epochs: 1 -> 3"):
        check_resumable(other, run_dir)
    # ... and the refusal happens before any work, through run() too.
    with pytest.raises(SystemExit, match="another configuration"):
        run(other, tmp_path / "repo", run_dir, resume=True, report=False)


def test_stop_after_names_a_stage_of_the_run(phantom_dir, tmp_path):
    cfg = _cfg(phantom_dir, tmp_path / "cache")
    with pytest.raises(ValueError, match="unknown stage"):
        run(cfg, tmp_path / "repo", tmp_path / "run", stop_after="export")
    no_over = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"overcluster": 0})})
    with pytest.raises(ValueError, match="no overcluster stage"):
        run(no_over, tmp_path / "repo", tmp_path / "run", stop_after="overcluster")


def test_config_differences_lists_nested_leaves():
    old = {"seed": 0, "threads": 1, "ssl": {"epochs": 1, "lr": 0.1}}
    new = {"seed": 1, "threads": 4, "ssl": {"epochs": 1, "lr": 0.2}, "extra": True}
    assert config_differences(old, new) == ["extra: None -> True", "seed: 0 -> 1", "ssl.lr: 0.1 -> 0.2"]


def test_checkpoints_check_the_images_and_start_clean(tmp_path):
    ck = Checkpoints(tmp_path, "data-1", resume=False)
    torch.manual_seed(7)
    np.random.seed(7)
    ck.save("ssl", {"history": [1.0]})
    expected = torch.rand(3), np.random.rand(2)
    # A resumed run restores the random state the stage left, whatever happened since.
    torch.manual_seed(0)
    np.random.seed(0)
    resumed = Checkpoints(tmp_path, "data-1", resume=True)
    state = resumed.load("ssl")
    assert state["history"] == [1.0]
    resumed.restore_rng(state)
    assert torch.equal(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(2), expected[1])
    with pytest.raises(SystemExit, match="images differ"):
        Checkpoints(tmp_path, "data-2", resume=True)
    # Without resume, the stages of an earlier run are removed; nothing is loaded.
    fresh = Checkpoints(tmp_path, "data-2", resume=False)
    assert not list((tmp_path / "checkpoints").glob("*.pt"))
    assert fresh.load("ssl") is None
