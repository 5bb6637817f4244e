"""Checkpoints and resumable runs: a run stopped after a stage, or after an epoch within one, and resumed
ends exactly as an uninterrupted one; a resume with another configuration or other images is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from service.clean import CleanConfig  # noqa: E402
from training.checkpoints import Checkpoints, RunStopped, check_resumable, config_differences  # noqa: E402
from training.cli import main as cli_main  # noqa: E402
from training.cluster.fusc import train_cluster_heads  # noqa: E402
from training.cluster.selflabel import self_label  # noqa: E402
from training.config import ClusterConfig, SelfLabelConfig, build_config  # noqa: E402
from training.data.phantoms import generate_dataset  # noqa: E402
from training.loop import snapshot  # noqa: E402
from training.models import build_backbone  # noqa: E402
from training.run import run  # noqa: E402


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    generate_dataset(root, 40, seed=5, progress=False)
    return root


def _cfg(phantom_dir, cache, ssl=None, **extra):
    return build_config(
        "smoke",
        data=[f"csv:{phantom_dir}"],
        test_fraction=0.25,
        cache_dir=cache,
        threads=1,
        ssl={"epochs": 2, **(ssl or {})},  # two epochs, so a run can stop between them
        cluster={"overcluster": 8},
        # Every image passes the threshold, so self-labeling trains on strong augmentations: it draws from
        # the global random state that the cluster stage left, which a resumed run must restore.
        selflabel={"threshold": 0.0},
        **extra,
    )


@pytest.fixture(scope="module")
def uninterrupted(phantom_dir, tmp_path_factory):
    """The run that the stopped and resumed ones must reproduce: (summary, run dir, model repository)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cfg = _cfg(phantom_dir, root / "cache")
    return run(cfg, root / "repo", root / "run", report=False), root / "run", root / "repo"


def _checkpoint_files(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))


def _assert_same_run(a, b):
    """Same embeddings, probabilities, over-clustering and metrics, bit for bit; the same exported head."""
    (summary_a, run_a, repo_a), (summary_b, run_b, repo_b) = a, b
    out_a, out_b = np.load(run_a / "outputs.npz"), np.load(run_b / "outputs.npz")
    assert out_a.files == out_b.files
    for key in out_a.files:
        np.testing.assert_array_equal(out_a[key], out_b[key], err_msg=key)
    assert summary_b["quality"] == summary_a["quality"]
    card_a = json.loads((repo_a / "model_card.json").read_text())
    card_b = json.loads((repo_b / "model_card.json").read_text())
    assert card_a["head"]["sha256"] == card_b["head"]["sha256"]


def test_stopped_and_resumed_run_equals_uninterrupted(phantom_dir, uninterrupted, tmp_path, capsys):
    cfg = _cfg(phantom_dir, tmp_path / "cache")
    run_b, out_b = tmp_path / "b" / "run", tmp_path / "b" / "repo"
    with pytest.raises(RunStopped, match="--resume"):
        run(cfg, out_b, run_b, stop_after="cluster", report=False)
    # The epoch checkpoints of the finished stages are gone.
    assert _checkpoint_files(run_b) == ["cluster.pt", "ssl.pt"]
    assert not (run_b / "summary.json").exists() and not out_b.exists()

    capsys.readouterr()
    resumed = run(cfg, out_b, run_b, resume=True, report=False)
    log = capsys.readouterr().out
    assert "ssl: resumed" in log and "cluster: resumed" in log and "selflabel: resumed" not in log
    assert resumed["resumed_stages"] == ["ssl", "cluster"]  # what the report names as loaded
    assert uninterrupted[0]["resumed_stages"] == []
    assert _checkpoint_files(run_b) == ["cluster.pt", "overcluster.pt", "selflabel.pt", "ssl.pt"]
    assert "overcluster" in np.load(run_b / "outputs.npz").files
    _assert_same_run(uninterrupted, (resumed, run_b, out_b))


def test_run_stopped_within_stages_resumes_bit_identically(phantom_dir, uninterrupted, tmp_path, capsys):
    """Stopped after SSL epoch 1 of 2, resumed and stopped after cluster epoch 2 of 5, resumed to the end:
    the data order, the optimiser and the random state continue as if the run had never stopped."""
    cfg = _cfg(phantom_dir, tmp_path / "cache")
    run_b, out_b = tmp_path / "run", tmp_path / "repo"
    with pytest.raises(RunStopped, match="after epoch 1 of the ssl stage; continue with --resume"):
        run(cfg, out_b, run_b, stop_after="ssl:1", report=False)
    assert _checkpoint_files(run_b) == ["ssl-epoch.pt"]

    capsys.readouterr()
    with pytest.raises(RunStopped, match="after epoch 2 of the cluster stage"):
        run(cfg, out_b, run_b, resume=True, stop_after="cluster:2", report=False)
    assert "ssl-epoch.pt after epoch 1" in capsys.readouterr().out
    assert _checkpoint_files(run_b) == ["cluster-epoch.pt", "ssl.pt"]

    resumed = run(cfg, out_b, run_b, resume=True, report=False)
    log = capsys.readouterr().out
    assert "ssl: resumed" in log and "cluster-epoch.pt after epoch 2" in log
    assert resumed["resumed_stages"] == ["ssl", "cluster (from epoch 2)"]
    assert _checkpoint_files(run_b) == ["cluster.pt", "overcluster.pt", "selflabel.pt", "ssl.pt"]
    _assert_same_run(uninterrupted, (resumed, run_b, out_b))


def test_dino_run_resumes_mid_ssl(phantom_dir, tmp_path):
    """DINO (ViT-tiny at 32 px, small head): the teacher, the centre and the step count that the teacher
    temperature and the frozen prototypes follow all come back with the epoch checkpoint."""
    dino = {
        "method": "dino",
        "backbone": "vit-tiny-16",
        "head_hidden": 64,
        "head_bottleneck": 16,
        "prototypes": 64,
        "local_crops": 2,
        "warmup_teacher_temp_epochs": 2,
        "freeze_last_layer_epochs": 1.5,
    }
    cfg = _cfg(phantom_dir, tmp_path / "cache", ssl=dino)
    cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"overcluster": 0})})
    whole = run(cfg, tmp_path / "a" / "repo", tmp_path / "a" / "run", report=False)
    run_b, out_b = tmp_path / "b" / "run", tmp_path / "b" / "repo"
    with pytest.raises(RunStopped):
        run(cfg, out_b, run_b, stop_after="ssl:1", report=False)
    resumed = run(cfg, out_b, run_b, resume=True, report=False)
    _assert_same_run((whole, tmp_path / "a" / "run", tmp_path / "a" / "repo"), (resumed, run_b, out_b))


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cluster_step_and_self_labeling_resume_with_the_backbone(one_thread, tiny_cluster_inputs):
    """Fine-tuning the backbone too: heads, backbone, optimiser and random state all continue exactly."""
    clean, cpu = CleanConfig(size=32), torch.device("cpu")
    frames, emb, nbrs = tiny_cluster_inputs
    cluster = ClusterConfig(num_clusters=3, num_heads=2, epochs=2, batch_size=8, update_backbone=True)
    selflabel = SelfLabelConfig(epochs=3, threshold=0.0, batch_size=8, update_backbone=True)

    def cluster_then_selflabel(resume_cluster=None, resume_selflabel=None):
        torch.manual_seed(0)
        backbone = build_backbone("resnet18-quarter", stem="stride1", img_size=32)
        states: dict = {"cluster": [], "selflabel": []}
        torch.manual_seed(123)  # a resumed loop must not depend on the random state it starts in
        head, info = train_cluster_heads(
            emb, nbrs, cluster, cpu, 0, backbone, frames, clean,
            on_epoch=states["cluster"].append, resume_state=resume_cluster,
        )  # fmt: skip
        after_cluster = snapshot([head.state_dict(), backbone.state_dict(), info])
        torch.manual_seed(456)
        history = self_label(
            backbone, head, frames, selflabel, clean, cpu, 0,
            on_epoch=states["selflabel"].append, resume_state=resume_selflabel, checkpoint_every=2,
        )  # fmt: skip
        return after_cluster, [head.state_dict(), backbone.state_dict(), history, torch.rand(4)], states

    *whole, states = cluster_then_selflabel()
    assert [s["epoch"] for s in states["cluster"]] == [1, 2]
    assert [s["epoch"] for s in states["selflabel"]] == [2]  # every 2nd epoch
    # The cluster step from its epoch-1 snapshot, then self-labeling from its epoch-2 one.
    *resumed, _ = cluster_then_selflabel(states["cluster"][0], states["selflabel"][0])
    for part_whole, part_resumed in zip(whole, resumed, strict=True):
        head_a, backbone_a, *rest_a = part_whole
        head_b, backbone_b, *rest_b = part_resumed
        assert _same_tensors(head_a, head_b) and _same_tensors(backbone_a, backbone_b)
        assert rest_a[0] == rest_b[0]  # cluster info / self-labeling history
    assert torch.equal(whole[1][3], resumed[1][3])  # the random state each leaves behind


def test_resume_refuses_another_configuration(phantom_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _cfg(phantom_dir, tmp_path / "cache")
    with pytest.raises(SystemExit, match="no run to resume"):
        check_resumable(cfg, run_dir)
    run_dir.mkdir()
    (run_dir / "config.json").write_text(cfg.model_dump_json())
    check_resumable(cfg, run_dir)  # same configuration: accepted
    # Neither the thread count nor the checkpoint interval changes results.
    check_resumable(cfg.model_copy(update={"threads": 2, "checkpoint_every": 5}), run_dir)
    other = cfg.model_copy(update={"ssl": cfg.ssl.model_copy(update={"epochs": 3})})
    with pytest.raises(SystemExit, match=r"ssl\.epochs: 2 -> 3"):
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
    with pytest.raises(ValueError, match="2 epoch.* no epoch 3"):
        run(cfg, tmp_path / "repo", tmp_path / "run", stop_after="ssl:3")
    with pytest.raises(ValueError, match="whole number"):
        run(cfg, tmp_path / "repo", tmp_path / "run", stop_after="ssl:last")
    every_2 = cfg.model_copy(update={"checkpoint_every": 2})
    with pytest.raises(ValueError, match="writes no checkpoint"):
        run(every_2, tmp_path / "repo", tmp_path / "run", stop_after="cluster:3")
    # The command line refuses it before any work (argparse's exit status 2).
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--preset", "smoke", "--run-dir", str(tmp_path / "run"), "--stop-after", "ssl:2"])
    assert exit_info.value.code == 2 and not (tmp_path / "run").exists()


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


def test_head_only_run_on_augmented_views_resumes_exactly(phantom_dir, tmp_path, monkeypatch):
    """The cluster step and self-labeling learning from augmented-view embeddings (the CPU presets' way): a
    run stopped after the cluster step ends as an uninterrupted one, and a resumed run that loads both
    stages does not embed the views again."""
    import training.run

    cfg = build_config(
        "smoke",
        data=[f"csv:{phantom_dir}"],
        test_fraction=0.25,
        cache_dir=tmp_path / "cache",
        threads=1,
        cluster={"views": 2, "standardize": True},
        selflabel={"threshold": 0.0},
    )
    whole = run(cfg, tmp_path / "a" / "repo", tmp_path / "a" / "run", report=False)
    run_b, out_b = tmp_path / "b" / "run", tmp_path / "b" / "repo"
    with pytest.raises(RunStopped):
        run(cfg, out_b, run_b, stop_after="cluster", report=False)
    resumed = run(cfg, out_b, run_b, resume=True, report=False)
    _assert_same_run((whole, tmp_path / "a" / "run", tmp_path / "a" / "repo"), (resumed, run_b, out_b))

    calls = []
    real = training.run.augmented_embeddings
    monkeypatch.setattr(
        training.run, "augmented_embeddings", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    again = run(cfg, out_b, run_b, resume=True, report=False)
    assert again["resumed_stages"] == ["ssl", "cluster", "selflabel"] and calls == []
