"""One training run end to end: data -> SSL backbone -> kNN mining -> FUSC heads -> evaluation -> export.

Each training stage (SSL, cluster step, self-labeling, over-clustering) writes a checkpoint into the run
folder as soon as it ends, and one after every ``cfg.checkpoint_every``-th epoch while it runs;
``resume=True`` re-uses the stages a run already finished, with the random state they left, and continues
an unfinished stage from its last epoch checkpoint, so an interrupted run ends exactly as an uninterrupted
one. ``cfg.seeds`` runs the whole pipeline once per seed and writes mean +- std of every metric.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.card import Naming, Provenance
from service.taxonomy import PHANTOM_VIEWS
from training.checkpoints import (
    Checkpoints,
    RunStopped,
    _head,
    _load_module,
    _module_state,
    check_resumable,
    check_stop_after,
    data_fingerprint,
    parse_stop_after,
)
from training.cluster.fusc import augmented_embeddings, predict, train_cluster_heads
from training.cluster.knn import mine_neighbors, neighbor_accuracy
from training.cluster.ood import calibrate_knn
from training.cluster.selflabel import self_label
from training.config import TrainConfig
from training.data.readers import ImageList, load_frames, read_csv_layout, read_spec, subject_split
from training.distributed import barrier, init_distributed, shutdown
from training.evaluate.health import embedding_health
from training.evaluate.metrics import coarse_map, mean_std
from training.evaluate.quality import (
    confidence_summary,
    evaluate,
    linear_probe,
    name_clusters,
    selflabel_change,
)
from training.export import write_model_repository
from training.methods import compute_embeddings, train_ssl
from training.models import build_backbone

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_commit(exclude: Path | None = None) -> str:
    """The commit the code ran from, marked ``-dirty`` when tracked files had uncommitted changes.

    ``exclude`` (the output repository, which a rebuild of the bundled model rewrites) does not count.
    """
    root = Path(__file__).resolve().parents[1]  # the checkout this code runs from, whatever the cwd
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], capture_output=True, text=True, timeout=5, cwd=root
            ).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        # An output folder outside the checkout is no pathspec of it (git would refuse the whole command).
        out = Path(exclude).resolve() if exclude else None
        inside = out is not None and out.is_relative_to(root)
        spec = ["--", ".", f":(exclude){out.relative_to(root)}"] if inside else []
        dirty = git("status", "--porcelain", "--untracked-files=no", *spec)
        return f"{commit}-dirty" if commit and dirty else commit
    except (OSError, subprocess.SubprocessError):
        return ""


def gather(cfg: TrainConfig) -> ImageList:
    images = ImageList()
    for spec in cfg.data:
        images.extend(read_spec(spec, cache_dir=cfg.cache_dir))
    if cfg.phantoms:
        from training.data.phantoms import GENERATOR_VERSION, VIEWS, generate_dataset

        views = list(cfg.phantom_views or VIEWS)
        unknown = sorted(set(views) - set(VIEWS))
        if unknown:
            raise SystemExit(f"unknown phantom views {unknown}; choose from {', '.join(VIEWS)}")
        tag = "" if views == list(VIEWS) else "-" + "+".join(views)
        root = cfg.cache_dir / f"phantoms-v{GENERATOR_VERSION}-n{cfg.phantoms}-s{cfg.phantom_seed}{tag}"
        if not (root / "labels.csv").exists():
            generate_dataset(root, cfg.phantoms, seed=cfg.phantom_seed, views=views)
        images.extend(read_csv_layout(root, name="phantoms"))
    if not len(images):
        raise SystemExit("no images: give --data and/or --phantoms")
    return images


# ------------------------------------------------------------------------------------------------ runs
def run(
    cfg: TrainConfig,
    out: Path,
    run_dir: Path,
    command: str = "",
    *,
    resume: bool = False,
    stop_after: str | None = None,
    report: bool = True,
) -> dict:
    """A whole run; with ``cfg.seeds``, one per seed in ``run_dir/seed-N`` plus the aggregate.

    ``resume``: continue an interrupted run in ``run_dir`` (same configuration, else refused).
    ``stop_after``: a stage name; the run stops (``RunStopped``) once that stage's checkpoint is written;
    ``"stage:N"``: once the stage's checkpoint after its N-th epoch is written.
    ``report``: write report.md/report.html with plots (off in quick tests).
    """
    check_stop_after(cfg, stop_after)
    if not cfg.seeds:
        return run_single(cfg, out, run_dir, command, resume=resume, stop_after=stop_after, report=report)
    run_dir = Path(run_dir)
    if resume:
        check_resumable(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    split_seed = cfg.split_seed if cfg.split_seed is not None else cfg.seeds[0]
    summaries = {}
    for i, seed in enumerate(cfg.seeds):
        sub = cfg.model_copy(update={"seed": seed, "seeds": [], "split_seed": split_seed})
        sub_dir = run_dir / f"seed-{seed}"
        sub_out = Path(out) if i == 0 else sub_dir / "model_repository"
        sub_resume = resume and (sub_dir / "config.json").exists()
        summaries[seed] = run_single(
            sub, sub_out, sub_dir, command, resume=sub_resume, stop_after=stop_after, report=report
        )
        if not summaries[seed]:  # a non-zero torchrun rank
            return {}
    aggregate = {
        "seeds": list(cfg.seeds),
        "split_seed": split_seed,
        "model_repository": str(out),
        "quality": mean_std([s["quality"] for s in summaries.values()]),
        "per_seed": {str(seed): s["quality"] for seed, s in summaries.items()},
    }
    (run_dir / "seeds.json").write_text(json.dumps(aggregate, indent=2, default=float))
    if report:
        from training.evaluate.report import write_seeds_report

        path = write_seeds_report(run_dir)
        print(f"{len(cfg.seeds)} seeds; aggregate report: {path}")
    return aggregate


@dataclass
class RunData:
    """The run's images after decode + clean: frames, labels, subjects, sources and the held-out mask."""

    paths: list
    frames: np.ndarray  # uint8 [N,S,S]
    labels: list
    subjects: list
    sources: list
    held: np.ndarray  # bool [N]
    split_seed: int
    skipped: dict

    @property
    def train(self) -> np.ndarray:
        return np.flatnonzero(~self.held)


def load_data(cfg: TrainConfig, ranks) -> RunData:
    # Rank 0 generates phantoms and fills the frame cache; the other ranks then read the cache.
    if ranks.main:
        images = gather(cfg)
        frames, ok, skipped = load_frames(images, cfg.clean, cfg.cache_dir, return_errors=True)
    barrier()
    if not ranks.main:
        images = gather(cfg)
        frames, ok, skipped = load_frames(images, cfg.clean, cfg.cache_dir, return_errors=True)
    keep = np.flatnonzero(ok)
    subjects = [images.subjects[i] for i in keep]
    split_seed = cfg.split_seed if cfg.split_seed is not None else cfg.seed
    held = (
        subject_split(subjects, cfg.test_fraction, split_seed)
        if cfg.test_fraction > 0
        else np.zeros(len(keep), bool)
    )
    return RunData(
        paths=[images.paths[i] for i in keep],
        frames=frames[keep],
        labels=[images.labels[i] for i in keep],
        subjects=subjects,
        sources=[images.sources[i] for i in keep],
        held=held,
        split_seed=split_seed,
        skipped=skipped,
    )


class Stages:
    """Each training stage of a run: loaded from its checkpoint when a resumed run finished it, else
    trained (going on from its last epoch snapshot when there is one) and checkpointed."""

    def __init__(
        self, cfg: TrainConfig, run_dir: Path, data: RunData, device: torch.device, ckpt, stop_after
    ):
        self.cfg, self.run_dir, self.data, self.device, self.ckpt = cfg, run_dir, data, device, ckpt
        self.stop_stage, self.stop_epoch = parse_stop_after(stop_after)
        self.frames = torch.from_numpy(data.frames)
        self.train_frames = self.frames[data.train]
        self._cluster_views: np.ndarray | None = None

    def _finished(self, stage: str, state: dict) -> None:
        self.ckpt.save(stage, state)  # rank 0 writes; under torchrun every rank stops when asked to
        if self.stop_stage == stage and self.stop_epoch is None:
            raise RunStopped(
                f"stopped after the {stage} stage; continue with --resume --run-dir {self.run_dir}"
            )

    def _epochs_of(self, stage: str) -> dict:
        """A stage's training loop writes its epoch checkpoints, and goes on from the last one."""

        def on_epoch(state: dict) -> None:
            self.ckpt.save_epoch(stage, state)
            if (self.stop_stage, self.stop_epoch) == (stage, state["epoch"]):
                raise RunStopped(
                    f"stopped after epoch {state['epoch']} of the {stage} stage; "
                    f"continue with --resume --run-dir {self.run_dir}"
                )

        return {
            "on_epoch": on_epoch,
            "resume_state": self.ckpt.load_epoch(stage),
            "checkpoint_every": self.cfg.checkpoint_every,
        }

    def views(self, backbone: nn.Module, augment, n: int, seed: int) -> np.ndarray:
        return augmented_embeddings(
            backbone, self.train_frames, augment, self.cfg.clean, self.device, n, seed
        )

    def cluster_views(self, backbone: nn.Module) -> np.ndarray | None:
        """The head-only cluster step's augmented-view embeddings (None: it has none), computed once and
        only when a stage that trains needs them: a resumed run that loads both stages skips them."""
        cfg = self.cfg
        if cfg.cluster.update_backbone or not cfg.cluster.views:
            return None
        if self._cluster_views is None:
            self._cluster_views = self.views(backbone, cfg.cluster.augment, cfg.cluster.views, cfg.seed)
        return self._cluster_views

    def ssl(self) -> tuple[nn.Module, list[float]]:
        cfg = self.cfg
        saved = self.ckpt.load("ssl")
        if saved:
            # The saved weights replace any initialisation: no pretrained file is needed to resume.
            backbone = build_backbone(cfg.ssl.backbone, stem=cfg.ssl.stem, img_size=cfg.clean.size)
            backbone = _load_module(backbone, saved["backbone"]).to(self.device)
            self.ckpt.restore_rng(saved)
            return backbone, saved["history"]
        backbone, history = train_ssl(
            self.train_frames, cfg.ssl, cfg.clean, self.device, cfg.seed, **self._epochs_of("ssl")
        )
        self._finished("ssl", {"backbone": _module_state(backbone), "history": history})
        return backbone, history

    def cluster(self, backbone: nn.Module, emb: np.ndarray, nbrs: np.ndarray) -> tuple[nn.Linear, dict]:
        cfg = self.cfg
        saved = self.ckpt.load("cluster")
        if saved:
            if saved.get("backbone"):
                _load_module(backbone, saved["backbone"])
            self.ckpt.restore_rng(saved)
            return _head(saved["head"]), saved["info"]
        head, info = train_cluster_heads(
            emb[self.data.train],
            nbrs,
            cfg.cluster,
            self.device,
            cfg.seed,
            backbone,
            self.train_frames,
            cfg.clean,
            views=self.cluster_views(backbone),
            **self._epochs_of("cluster"),
        )
        head = head.cpu()
        state = {
            "head": _module_state(head),
            "info": info,
            "backbone": _module_state(backbone) if cfg.cluster.update_backbone else None,
        }
        self._finished("cluster", state)
        return head, info

    def selflabel(self, backbone: nn.Module, head: nn.Linear, emb: np.ndarray) -> tuple[nn.Linear, dict]:
        cfg = self.cfg
        saved = self.ckpt.load("selflabel")
        if saved:
            if saved.get("backbone"):
                _load_module(backbone, saved["backbone"])
            self.ckpt.restore_rng(saved)
            return _head(saved["head"]), saved["selflabel"]
        head_only = not cfg.selflabel.update_backbone
        views = None
        if head_only:
            # Its own views when asked for (or when the cluster step had none), else the cluster step's.
            views = None if cfg.selflabel.views else self.cluster_views(backbone)
            if views is None:
                views = self.views(backbone, cfg.selflabel.augment, cfg.selflabel.views or 4, cfg.seed + 1)
        history = self_label(
            backbone,
            head,
            self.train_frames,
            cfg.selflabel,
            cfg.clean,
            self.device,
            cfg.seed,
            embeddings=emb[self.data.train] if head_only else None,
            views=views if head_only else None,
            **self._epochs_of("selflabel"),
        )
        state = {
            "head": _module_state(head),
            "selflabel": history,
            "backbone": _module_state(backbone) if cfg.selflabel.update_backbone else None,
        }
        self._finished("selflabel", state)
        return head, history

    def overcluster(self, emb_ssl: np.ndarray, nbrs: np.ndarray) -> tuple[nn.Linear, dict]:
        # Head-only, on the SSL embeddings and the same neighbours as the main cluster step; it comes last,
        # so asking for it leaves the main result unchanged.
        saved = self.ckpt.load("overcluster")
        if saved:
            self.ckpt.restore_rng(saved)
            return _head(saved["head"]), saved["info"]
        cfg = self.cfg
        over_cfg = cfg.cluster.model_copy(
            update={"num_clusters": cfg.cluster.overcluster, "update_backbone": False, "views": 0}
        )
        head, info = train_cluster_heads(
            emb_ssl[self.data.train], nbrs, over_cfg, self.device, cfg.seed, **self._epochs_of("overcluster")
        )
        head = head.cpu()
        self._finished("overcluster", {"head": _module_state(head), "info": info})
        return head, info


def run_single(
    cfg: TrainConfig,
    out: Path,
    run_dir: Path,
    command: str = "",
    *,
    resume: bool = False,
    stop_after: str | None = None,
    report: bool = True,
) -> dict:
    """One seed: data -> SSL -> kNN mining -> cluster step -> self-labeling -> measures -> export."""
    t0 = time.time()
    commit = git_commit(exclude=out)  # the code as it is when the run starts, whatever is edited later
    run_dir = Path(run_dir)
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ranks, rank_device = init_distributed(cfg.device)
    device = rank_device or pick_device(cfg.device)
    if ranks.main:
        if resume:
            check_resumable(cfg, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    data = load_data(cfg, ranks)
    train = data.train
    print(f"{len(data.paths)} images ({len(train)} train, {int(data.held.sum())} held out) on {device}")
    fingerprint = data_fingerprint(data.paths, data.labels, data.subjects)
    stages = Stages(
        cfg, run_dir, data, device, Checkpoints(run_dir, fingerprint, resume, ranks.main), stop_after
    )

    # 1. Self-supervision (from ImageNet weights or from scratch), the only stage that runs on every rank.
    backbone, ssl_hist = stages.ssl()
    if ranks.enabled:
        # What follows is head-only or small: rank 0 finishes the run alone.
        barrier()
        shutdown()
        if not ranks.main:
            return {}
    emb = emb_ssl = compute_embeddings(backbone, stages.frames, cfg.clean, device)
    health = embedding_health(emb[train], cfg.ssl.method, ssl_hist, cfg.ssl.prototypes)
    if health["collapsed"]:
        log.warning("the SSL embedding looks collapsed: %s", "; ".join(health["reasons"]))

    # 2. Neighbours in embedding space (the head-only steps also learn from augmented views, see Stages).
    nbrs = mine_neighbors(emb[train], cfg.cluster.neighbors)

    # 3. The FUSC cluster step.
    head, info = stages.cluster(backbone, emb, nbrs)
    if cfg.cluster.update_backbone:
        emb = compute_embeddings(backbone, stages.frames, cfg.clean, device)
    probs_cluster_step = predict(head, emb)
    preds = {"fusc_cluster_step": probs_cluster_step.argmax(1)}

    # 4. Self-labeling on the confident images.
    if cfg.selflabel.epochs > 0:
        head, info["selflabel"] = stages.selflabel(backbone, head, emb)
        if cfg.selflabel.update_backbone:
            emb = compute_embeddings(backbone, stages.frames, cfg.clean, device)
    probs = predict(head, emb)
    preds["fusc"] = pred = probs.argmax(1)

    # 5. Over-clustering (paper Table 3), when asked for.
    overcluster = None
    if cfg.cluster.overcluster > 0:
        over_head, over_info = stages.overcluster(emb_ssl, nbrs)
        preds["fusc_overcluster"] = predict(over_head, emb_ssl).argmax(1)
        overcluster = {
            "k": cfg.cluster.overcluster,
            "k_main": cfg.cluster.num_clusters,
            "filled_clusters_train": int(len(np.unique(preds["fusc_overcluster"][train]))),
            "best_head": over_info["best_head"],
        }

    # 6. What the run measures, and the model repository with its card.
    quality = measure(cfg, data, preds, emb, emb_ssl, nbrs, probs_cluster_step, probs)
    quality.update(
        {
            "ssl_loss_per_epoch": ssl_hist,
            "ssl_health": health,
            "cluster_final_losses": info["final_losses"],
            "cluster_loss_history": info["history"],
            "best_head": info["best_head"],
            "selflabel": info.get("selflabel"),
            "overcluster": overcluster,
            "skipped_files": data.skipped,
        }
    )
    card = export(cfg, out, backbone, head, emb, data, pred, quality, command, device, commit)
    summary = {
        "seconds": round(time.time() - t0, 1),
        "resumed_stages": stages.ckpt.resumed,
        "card_version": card.version,
        "quality": quality,
    }
    save_outputs(run_dir, cfg, data, preds, emb, probs, probs_cluster_step, backbone, head, summary)
    if report:
        from training.evaluate.report import write_report

        write_report(run_dir)
    print(f"model repository written to {out} in {summary['seconds']} s; report: {run_dir / 'report.md'}")
    return summary


def measure(
    cfg: TrainConfig,
    data: RunData,
    preds: dict,
    emb: np.ndarray,
    emb_ssl: np.ndarray,
    nbrs: np.ndarray,
    probs_cluster_step: np.ndarray,
    probs: np.ndarray,
) -> dict:
    """Each prediction against the labels with the baselines, the linear probe, neighbour agreement, cluster
    sizes, the confidence distribution and what self-labeling changed."""
    held, train, labels = data.held, data.train, data.labels
    coarse = coarse_map(cfg.coarse_map)

    def split_eval(mask: np.ndarray) -> dict:
        idx = np.flatnonzero(mask)
        return evaluate(
            {name: p[idx] for name, p in preds.items()},
            emb[idx],
            data.frames[idx],
            [labels[i] for i in idx],
            [data.sources[i] for i in idx],
            cfg.cluster.num_clusters,
            cfg.seed,
            coarse,
            ssl_embeddings=emb_ssl[idx] if emb is not emb_ssl else None,
        )

    threshold = cfg.selflabel.threshold
    return {
        "train_transductive": split_eval(~held),
        "heldout_inductive": split_eval(held) if held.any() else {},
        "linear_probe_heldout": linear_probe(emb, data.frames, labels, data.sources, held, cfg.seed)
        if held.any()
        else {},
        "neighbor_accuracy_train": (
            neighbor_accuracy(nbrs, np.array([labels[i] or "" for i in train]))
            if all(lab is not None for lab in labels)
            else None
        ),
        "cluster_sizes_train": np.bincount(preds["fusc"][train], minlength=cfg.cluster.num_clusters).tolist(),
        "confidence_train": {
            "cluster_step": confidence_summary(probs_cluster_step[train], threshold),
            "final": confidence_summary(probs[train], threshold),
        },
        "selflabel_changed": selflabel_change(probs_cluster_step[train], probs[train], threshold)
        if cfg.selflabel.epochs > 0
        else None,
    }


def export(
    cfg: TrainConfig,
    out: Path,
    backbone: nn.Module,
    head: nn.Linear,
    emb: np.ndarray,
    data: RunData,
    pred: np.ndarray,
    quality: dict,
    command: str,
    device: torch.device,
    commit: str,
):
    """The model repository: ONNX backbone and head, the OOD bank, and the card with names and provenance."""
    train, held = data.train, data.held
    names = (
        name_clusters(pred[train], [data.labels[i] for i in train], cfg.cluster.num_clusters)
        if cfg.name_clusters_from_labels
        else {}
    )
    provenance = Provenance(
        command=command,
        datasets=sorted(set(data.sources)),
        num_images=len(data.paths),
        ssl_method=cfg.ssl.method,
        backbone_arch=cfg.ssl.backbone,
        epochs={"ssl": cfg.ssl.epochs, "cluster": cfg.cluster.epochs, "selflabel": cfg.selflabel.epochs},
        seed=cfg.seed,
        test_fraction=cfg.test_fraction,
        split_seed=data.split_seed,
        data=list(cfg.data),
        phantoms=cfg.phantoms,
        phantom_seed=cfg.phantom_seed,
        phantom_views=list(cfg.phantom_views or (PHANTOM_VIEWS if cfg.phantoms else ())),
        git_commit=commit,
        torch_version=torch.__version__,
        device=f"{device.type} ({platform.processor() or platform.machine()})",
        note="cluster names taken from majority labels of the training images" if names else "",
    )
    ood, bank = calibrate_knn(
        emb[train], emb[held] if held.any() else None, quantile=cfg.ood_quantile, seed=cfg.seed
    )
    fields = {
        "name": cfg.name,
        "version": cfg.version,
        "preprocess": cfg.clean,
        "cluster_names": names,
        "ood": ood,
        "naming": Naming(min_confidence=cfg.naming_min_confidence),
        "provenance": provenance,
        "quality": quality,
    }
    return write_model_repository(out, backbone, head, fields, ood_bank=bank)


def save_outputs(
    run_dir: Path,
    cfg: TrainConfig,
    data: RunData,
    preds: dict,
    emb: np.ndarray,
    probs: np.ndarray,
    probs_cluster_step: np.ndarray,
    backbone: nn.Module,
    head: nn.Linear,
    summary: dict,
) -> None:
    """Everything the report needs, so it can be re-made without re-training, and the final weights."""
    extra = {"overcluster": preds["fusc_overcluster"]} if "fusc_overcluster" in preds else {}
    np.savez_compressed(
        run_dir / "outputs.npz",
        embeddings=emb,
        probs=probs,
        probs_cluster_step=probs_cluster_step,
        frames=data.frames,
        paths=np.array([str(p) for p in data.paths]),
        labels=np.array([lab or "" for lab in data.labels]),
        sources=np.array(data.sources),
        subjects=np.array(data.subjects),
        held_out=data.held,
        **extra,
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    torch.save(
        {"backbone": backbone.state_dict(), "head": head.state_dict(), "config": cfg.model_dump(mode="json")},
        run_dir / "checkpoint.pt",
    )
