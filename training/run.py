"""One training run end to end: data -> SSL backbone -> kNN mining -> FUSC heads -> evaluation -> export.

Each training stage (SSL, cluster step, self-labeling, over-clustering) writes a checkpoint into the run
folder as soon as it ends, and one after every ``cfg.checkpoint_every``-th epoch while it runs;
``resume=True`` re-uses the stages a run already finished, with the random state they left, and continues
an unfinished stage from its last epoch checkpoint, so an interrupted run ends exactly as an uninterrupted
one. ``cfg.seeds`` runs the whole pipeline once per seed and writes mean +- std of every metric.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans

from service.card import Provenance
from training.cluster.fusc import predict, train_cluster_heads
from training.cluster.knn import mine_neighbors, neighbor_accuracy
from training.cluster.ood import calibrate_ood
from training.cluster.selflabel import self_label
from training.config import TrainConfig
from training.data.readers import ImageList, load_frames, read_csv_layout, read_spec, subject_split
from training.distributed import barrier, init_distributed, shutdown
from training.evaluate.health import embedding_health
from training.evaluate.metrics import cluster_metrics, coarse_map, mean_std, raw_pixels, to_coarse
from training.export import write_model_repository
from training.loop import checkpoint_due
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
    try:

        def git(*args: str) -> str:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        spec = ["--", ".", f":(exclude){Path(exclude).resolve()}"] if exclude else []
        dirty = git("status", "--porcelain", "--untracked-files=no", *spec)
        return f"{commit}-dirty" if commit and dirty else commit
    except (OSError, subprocess.SubprocessError):
        return ""


def gather(cfg: TrainConfig) -> ImageList:
    images = ImageList()
    for spec in cfg.data:
        images.extend(read_spec(spec, cache_dir=cfg.cache_dir))
    if cfg.phantoms:
        from training.data.phantoms import GENERATOR_VERSION, generate_dataset

        root = cfg.cache_dir / f"phantoms-v{GENERATOR_VERSION}-n{cfg.phantoms}-s{cfg.phantom_seed}"
        if not (root / "labels.csv").exists():
            generate_dataset(root, cfg.phantoms, seed=cfg.phantom_seed)
        images.extend(read_csv_layout(root, name="phantoms"))
    if not len(images):
        raise SystemExit("no images: give --data and/or --phantoms")
    return images


def evaluate(
    preds: dict[str, np.ndarray],
    embeddings: np.ndarray,
    frames: np.ndarray,
    labels: list,
    sources: list,
    k: int,
    seed: int,
    coarse: dict[str, str] | None = None,
    ssl_embeddings: np.ndarray | None = None,
) -> dict:
    """Per labelled source: metrics of each prediction, of k-means on the embeddings and on raw pixels.

    ``ssl_embeddings``: when the backbone was fine-tuned after SSL, its embeddings before that, scored with
    k-means too (``kmeans_ssl_embeddings``), so the cluster step is compared with both.

    With a ``coarse`` map that merges some of a source's labels, the same predictions are also scored
    against the coarse views (``res["coarse"]``, paper Table 2).
    """
    out: dict = {}
    labels_arr = np.array([lab if lab is not None else "" for lab in labels])
    sources_arr = np.array(sources)
    for source in sorted(set(sources)):
        sel = (sources_arr == source) & (labels_arr != "")
        if sel.sum() < 2 or len(set(labels_arr[sel])) < 2:
            continue
        kk = min(k, int(sel.sum()))
        scored = {name: pred[sel] for name, pred in preds.items()}
        scored["kmeans_embeddings"] = KMeans(kk, n_init=10, random_state=seed).fit_predict(embeddings[sel])
        if ssl_embeddings is not None:
            scored["kmeans_ssl_embeddings"] = KMeans(kk, n_init=10, random_state=seed).fit_predict(
                ssl_embeddings[sel]
            )
        scored["kmeans_raw_pixels"] = KMeans(kk, n_init=10, random_state=seed).fit_predict(
            raw_pixels(frames[sel])
        )
        res: dict = {"n": int(sel.sum()), "classes": int(len(set(labels_arr[sel])))}
        res.update({name: cluster_metrics(pred, labels_arr[sel]) for name, pred in scored.items()})
        if coarse:
            coarse_labels = to_coarse(labels_arr[sel], coarse)
            n_coarse = len(set(coarse_labels))
            if 2 <= n_coarse < res["classes"]:
                res["coarse"] = {
                    "classes": n_coarse,
                    **{name: cluster_metrics(pred, coarse_labels) for name, pred in scored.items()},
                }
        out[source] = res
    return out


def linear_probe(
    embeddings: np.ndarray, frames: np.ndarray, labels: list, sources: list, held: np.ndarray, seed: int
) -> dict[str, dict[str, float]]:
    """Supervised upper bound: logistic regression on the frozen embeddings (and on raw pixels), fitted on
    the training subjects' labels and scored on the held-out subjects, per labelled source."""
    from sklearn.linear_model import LogisticRegression

    out: dict[str, dict[str, float]] = {}
    labels_arr = np.array([lab or "" for lab in labels])
    sources_arr = np.array(sources)
    for source in sorted(set(sources)):
        sel = (sources_arr == source) & (labels_arr != "")
        fit, test = sel & ~held, sel & held
        if len(set(labels_arr[fit])) < 2 or test.sum() < 2:
            continue
        scores = {}
        for name, feats in (("embeddings", embeddings), ("raw_pixels", raw_pixels(frames))):
            x_fit, x_test = feats[fit], feats[test]
            clf = LogisticRegression(max_iter=2000, random_state=seed).fit(x_fit, labels_arr[fit])
            scores[name] = float(clf.score(x_test, labels_arr[test]))
        out[source] = scores
    return out


def name_clusters(pred: np.ndarray, labels: list, k: int, min_share: float = 0.6) -> dict[int, str]:
    """Name a cluster after its majority label when that label holds ``min_share`` of its labelled members."""
    names: dict[int, str] = {}
    for c in range(k):
        members = [labels[i] for i in np.flatnonzero(pred == c) if labels[i]]
        if members:
            values, counts = np.unique(members, return_counts=True)
            if counts.max() / len(members) >= min_share:
                names[c] = str(values[counts.argmax()])
    return names


# ------------------------------------------------------------------------------------ checkpoints, resume
STAGES = ("ssl", "cluster", "selflabel", "overcluster")
# Settings that may change between an interrupted run and its resumption: they do not change results.
RESUME_FREE = ("threads", "checkpoint_every")


class RunStopped(Exception):
    """Raised when a run was asked to stop after a stage or an epoch of one (``stop_after``); its
    checkpoint is written."""


def stage_epochs(cfg: TrainConfig, stage: str) -> int:
    return {
        "ssl": cfg.ssl.epochs,
        "cluster": cfg.cluster.epochs,
        "selflabel": cfg.selflabel.epochs,
        "overcluster": cfg.cluster.epochs,
    }[stage]


def parse_stop_after(stop_after: str | None) -> tuple[str | None, int | None]:
    """``"ssl"`` -> ("ssl", None): after the stage; ``"ssl:2"`` -> ("ssl", 2): after its 2nd epoch."""
    if stop_after is None:
        return None, None
    stage, colon, epoch = stop_after.partition(":")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    if not colon:
        return stage, None
    if not epoch.isdigit():
        raise ValueError(f"stop after {stop_after!r}: give STAGE or STAGE:EPOCH with a whole number")
    return stage, int(epoch)


def check_stop_after(cfg: TrainConfig, stop_after: str | None) -> None:
    """Refuse a ``stop_after`` that the configuration would never reach."""
    stage, epoch = parse_stop_after(stop_after)
    skipped = {"selflabel": cfg.selflabel.epochs <= 0, "overcluster": cfg.cluster.overcluster <= 0}
    if skipped.get(stage or ""):
        raise ValueError(f"this configuration has no {stage} stage to stop after")
    if stage is None or epoch is None:
        return
    epochs = stage_epochs(cfg, stage)
    if not 1 <= epoch <= epochs:
        raise ValueError(f"the {stage} stage has {epochs} epoch(s); there is no epoch {epoch} to stop after")
    if not checkpoint_due(epoch, cfg.checkpoint_every):
        raise ValueError(
            f"epoch {epoch} of the {stage} stage writes no checkpoint "
            f"(checkpoint_every = {cfg.checkpoint_every}); stop after a multiple of it"
        )


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two configuration dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, path + ".")
        elif a != b and path not in RESUME_FREE:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def check_resumable(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume into a run folder that holds no run, or a run of another configuration."""
    path = run_dir / "config.json"
    if not path.exists():
        raise SystemExit(f"--resume: {run_dir} holds no run to resume (no config.json)")
    old = json.loads(path.read_text())
    diff = config_differences(old, json.loads(cfg.model_dump_json()))
    if diff:
        raise SystemExit(
            f"--resume: {run_dir} was started with another configuration ({'; '.join(diff)}); "
            "resume with the same options, or start a new run (another --run-dir, or no --resume)"
        )


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """One file per finished stage under ``run_dir/checkpoints``, with the random state the stage left
    (``load`` a stage, rebuild its modules, then ``restore_rng``); while a stage runs, ``<stage>-epoch.pt``
    holds its last epoch snapshot (``save_epoch``, ``load_epoch``), removed once the stage's file is written.

    A fresh run (no ``resume``) starts by removing the stage files of an earlier run in the same folder.
    A resumed run loads the finished stages instead of training them, after checking that the images are
    the ones the interrupted run used (a fingerprint of their paths, labels and subjects).
    """

    def __init__(self, run_dir: Path, data_fingerprint: str, resume: bool, write: bool = True):
        self.resumed: list[str] = []  # stages (or their epoch snapshots) loaded instead of trained
        self.dir = Path(run_dir) / "checkpoints"
        self.resume, self.write = resume, write
        meta = self.dir / "meta.json"
        if write and not resume and self.dir.exists():
            shutil.rmtree(self.dir)
        if resume and meta.exists():
            old = json.loads(meta.read_text())["data"]
            if old != data_fingerprint:
                raise SystemExit(
                    f"--resume: the images differ from those of the interrupted run in {run_dir}; "
                    "start a new run instead"
                )
        if write:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps({"data": data_fingerprint}))

    def load(self, stage: str) -> dict | None:
        path = self.dir / f"{stage}.pt"
        if not (self.resume and path.exists()):
            return None
        print(f"{stage}: resumed from {path}")
        self.resumed.append(stage)
        if self.write:  # left by a run killed between writing the stage's file and removing this one
            self._epoch_path(stage).unlink(missing_ok=True)
        return torch.load(path, map_location="cpu", weights_only=False)

    def load_epoch(self, stage: str) -> dict | None:
        """The last epoch snapshot of an unfinished stage, for its training loop's ``resume_state``."""
        path = self._epoch_path(stage)
        if not (self.resume and path.exists()):
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        print(f"{stage}: resumed from {path} after epoch {state['epoch']}")
        self.resumed.append(f"{stage} (from epoch {state['epoch']})")
        return state

    @staticmethod
    def restore_rng(state: dict) -> None:
        """Put back the random state the stage left; call it after rebuilding the stage's modules, whose
        initialisation draws from the generator too."""
        _set_rng_state(state["rng"])

    def save(self, stage: str, state: dict) -> None:
        if not self.write:
            return
        self._write(self.dir / f"{stage}.pt", {**state, "rng": _rng_state()})
        self._epoch_path(stage).unlink(missing_ok=True)

    def save_epoch(self, stage: str, state: dict) -> None:
        """An epoch snapshot from a training loop's ``on_epoch`` (it holds its own random state)."""
        if self.write:
            self._write(self._epoch_path(stage), state)

    def _epoch_path(self, stage: str) -> Path:
        return self.dir / f"{stage}-epoch.pt"

    @staticmethod
    def _write(path: Path, state: dict) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # a run killed while saving leaves the previous file, never half of one


def data_fingerprint(paths: list, labels: list, subjects: list) -> str:
    blob = json.dumps([[str(p) for p in paths], [lab or "" for lab in labels], subjects])
    return hashlib.sha256(blob.encode()).hexdigest()


def _module_state(module: torch.nn.Module) -> dict:
    return {
        "state": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        "requires_grad": [p.requires_grad for p in module.parameters()],
    }


def _load_module(module: torch.nn.Module, saved: dict) -> torch.nn.Module:
    module.load_state_dict(saved["state"])
    for p, flag in zip(module.parameters(), saved["requires_grad"], strict=True):
        p.requires_grad_(flag)
    return module.eval()


def _head(saved: dict) -> torch.nn.Linear:
    k, dim = saved["state"]["weight"].shape
    return _load_module(torch.nn.Linear(dim, k), saved)


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
    t0 = time.time()
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
    coarse = coarse_map(cfg.coarse_map)

    # Rank 0 generates phantoms and fills the frame cache; the other ranks then read the cache.
    if ranks.main:
        images = gather(cfg)
        frames_np, ok, skipped = load_frames(images, cfg.clean, cfg.cache_dir, return_errors=True)
    barrier()
    if not ranks.main:
        images = gather(cfg)
        frames_np, ok, skipped = load_frames(images, cfg.clean, cfg.cache_dir, return_errors=True)
    keep = np.flatnonzero(ok)
    frames_np = frames_np[keep]
    labels = [images.labels[i] for i in keep]
    subjects = [images.subjects[i] for i in keep]
    sources = [images.sources[i] for i in keep]
    split_seed = cfg.split_seed if cfg.split_seed is not None else cfg.seed
    held = (
        subject_split(subjects, cfg.test_fraction, split_seed)
        if cfg.test_fraction > 0
        else np.zeros(len(keep), bool)
    )
    train_idx = np.flatnonzero(~held)
    print(f"{len(keep)} images ({len(train_idx)} train, {int(held.sum())} held out) on {device}")
    ckpt = Checkpoints(
        run_dir, data_fingerprint([images.paths[i] for i in keep], labels, subjects), resume, ranks.main
    )

    stop_stage, stop_epoch = parse_stop_after(stop_after)

    def finished(stage: str, state: dict) -> None:
        ckpt.save(stage, state)
        if stop_stage == stage and stop_epoch is None:
            raise RunStopped(f"stopped after the {stage} stage; continue with --resume --run-dir {run_dir}")

    def epochs_of(stage: str) -> dict:
        """A stage's training loop writes its epoch checkpoints, and goes on from the last one."""

        def on_epoch(state: dict) -> None:
            ckpt.save_epoch(stage, state)  # rank 0 writes; under torchrun every rank stops
            if (stop_stage, stop_epoch) == (stage, state["epoch"]):
                raise RunStopped(
                    f"stopped after epoch {state['epoch']} of the {stage} stage; "
                    f"continue with --resume --run-dir {run_dir}"
                )

        return {
            "on_epoch": on_epoch,
            "resume_state": ckpt.load_epoch(stage),
            "checkpoint_every": cfg.checkpoint_every,
        }

    frames = torch.from_numpy(frames_np)
    saved = ckpt.load("ssl")
    if saved:
        backbone = _load_module(
            build_backbone(cfg.ssl.backbone, stem=cfg.ssl.stem, img_size=cfg.clean.size, init="scratch"),
            saved["backbone"],
        ).to(device)
        ssl_hist = saved["history"]
        ckpt.restore_rng(saved)
    else:
        backbone, ssl_hist = train_ssl(
            frames[train_idx], cfg.ssl, cfg.clean, device, cfg.seed, **epochs_of("ssl")
        )
        # Rank 0 writes; under torchrun every rank stops when asked to.
        finished("ssl", {"backbone": _module_state(backbone), "history": ssl_hist})
    if ranks.enabled:
        # The cluster step is head-only and takes seconds: rank 0 finishes the run alone.
        barrier()
        shutdown()
        if not ranks.main:
            return {}
    emb = emb_ssl = compute_embeddings(backbone, frames, cfg.clean, device)
    health = embedding_health(emb[train_idx], cfg.ssl.method, ssl_hist, cfg.ssl.prototypes)
    if health["collapsed"]:
        log.warning("the SSL embedding looks collapsed: %s", "; ".join(health["reasons"]))
    nbrs = mine_neighbors(emb[train_idx], cfg.cluster.neighbors)

    saved = ckpt.load("cluster")
    if saved:
        head, info = _head(saved["head"]), saved["info"]
        if saved.get("backbone"):
            _load_module(backbone, saved["backbone"])
        ckpt.restore_rng(saved)
    else:
        head, info = train_cluster_heads(
            emb[train_idx],
            nbrs,
            cfg.cluster,
            device,
            cfg.seed,
            backbone,
            frames[train_idx],
            cfg.clean,
            **epochs_of("cluster"),
        )
        head = head.cpu()
        finished(
            "cluster",
            {
                "head": _module_state(head),
                "info": info,
                "backbone": _module_state(backbone) if cfg.cluster.update_backbone else None,
            },
        )
    if cfg.cluster.update_backbone:
        emb = compute_embeddings(backbone, frames, cfg.clean, device)
    preds = {"fusc_cluster_step": predict(head, emb).argmax(1)}

    if cfg.selflabel.epochs > 0:
        saved = ckpt.load("selflabel")
        if saved:
            head, info["selflabel"] = _head(saved["head"]), saved["selflabel"]
            if saved.get("backbone"):
                _load_module(backbone, saved["backbone"])
            ckpt.restore_rng(saved)
        else:
            info["selflabel"] = self_label(
                backbone,
                head,
                frames[train_idx],
                cfg.selflabel,
                cfg.clean,
                device,
                cfg.seed,
                **epochs_of("selflabel"),
            )
            finished(
                "selflabel",
                {
                    "head": _module_state(head),
                    "selflabel": info["selflabel"],
                    "backbone": _module_state(backbone) if cfg.selflabel.update_backbone else None,
                },
            )
        if cfg.selflabel.update_backbone:
            emb = compute_embeddings(backbone, frames, cfg.clean, device)
        preds["fusc"] = predict(head, emb).argmax(1)
    else:
        preds["fusc"] = preds["fusc_cluster_step"]
    pred = preds["fusc"]

    overcluster = None
    if cfg.cluster.overcluster > 0:
        # Head-only, on the SSL embeddings and the same neighbours as the main cluster step; it comes last,
        # so asking for it leaves the main result unchanged.
        saved = ckpt.load("overcluster")
        if saved:
            over_head, over_info = _head(saved["head"]), saved["info"]
            ckpt.restore_rng(saved)
        else:
            over_cfg = cfg.cluster.model_copy(
                update={"num_clusters": cfg.cluster.overcluster, "update_backbone": False}
            )
            over_head, over_info = train_cluster_heads(
                emb_ssl[train_idx], nbrs, over_cfg, device, cfg.seed, **epochs_of("overcluster")
            )
            over_head = over_head.cpu()
            finished("overcluster", {"head": _module_state(over_head), "info": over_info})
        preds["fusc_overcluster"] = predict(over_head, emb_ssl).argmax(1)
        overcluster = {
            "k": cfg.cluster.overcluster,
            "k_main": cfg.cluster.num_clusters,
            "filled_clusters_train": int(len(np.unique(preds["fusc_overcluster"][train_idx]))),
            "best_head": over_info["best_head"],
        }

    def split_eval(mask: np.ndarray) -> dict:
        idx = np.flatnonzero(mask)
        return evaluate(
            {name: p[idx] for name, p in preds.items()},
            emb[idx],
            frames_np[idx],
            [labels[i] for i in idx],
            [sources[i] for i in idx],
            cfg.cluster.num_clusters,
            cfg.seed,
            coarse,
            ssl_embeddings=emb_ssl[idx] if emb is not emb_ssl else None,
        )

    labelled = np.array([lab is not None for lab in labels])
    quality = {
        "train_transductive": split_eval(~held),
        "heldout_inductive": split_eval(held) if held.any() else {},
        "linear_probe_heldout": linear_probe(emb, frames_np, labels, sources, held, cfg.seed)
        if held.any()
        else {},
        "neighbor_accuracy_train": (
            neighbor_accuracy(nbrs, np.array([labels[i] or "" for i in train_idx]))
            if labelled.all()
            else None
        ),
        "cluster_sizes_train": np.bincount(pred[train_idx], minlength=cfg.cluster.num_clusters).tolist(),
        "ssl_loss_per_epoch": ssl_hist,
        "ssl_health": health,
        "cluster_final_losses": info["final_losses"],
        "cluster_loss_history": info["history"],
        "best_head": info["best_head"],
        "selflabel": info.get("selflabel"),
        "overcluster": overcluster,
        "skipped_files": skipped,
    }
    names = (
        name_clusters(pred[train_idx], [labels[i] for i in train_idx], cfg.cluster.num_clusters)
        if (cfg.name_clusters_from_labels)
        else {}
    )
    provenance = Provenance(
        command=command,
        datasets=sorted(set(sources)),
        num_images=len(keep),
        ssl_method=cfg.ssl.method,
        backbone_arch=cfg.ssl.backbone,
        epochs={"ssl": cfg.ssl.epochs, "cluster": cfg.cluster.epochs, "selflabel": cfg.selflabel.epochs},
        seed=cfg.seed,
        git_commit=git_commit(exclude=out),
        torch_version=torch.__version__,
        device=f"{device.type} ({platform.processor() or platform.machine()})",
        note="cluster names taken from majority labels of the training images" if names else "",
    )
    ood = calibrate_ood(emb[train_idx], pred[train_idx], cfg.cluster.num_clusters)
    card = write_model_repository(
        out,
        backbone,
        head,
        {
            "name": cfg.name,
            "version": cfg.version,
            "preprocess": cfg.clean,
            "cluster_names": names,
            "ood": ood,
            "provenance": provenance,
            "quality": quality,
        },
    )
    summary = {
        "seconds": round(time.time() - t0, 1),
        "resumed_stages": ckpt.resumed,
        "card_version": card.version,
        "quality": quality,
    }
    # Everything the report needs, so it can be re-made without re-training.
    extra = {"overcluster": preds["fusc_overcluster"]} if overcluster else {}
    np.savez_compressed(
        run_dir / "outputs.npz",
        embeddings=emb,
        probs=predict(head, emb),
        frames=frames_np,
        labels=np.array([lab or "" for lab in labels]),
        sources=np.array(sources),
        subjects=np.array(subjects),
        held_out=held,
        **extra,
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    torch.save(
        {"backbone": backbone.state_dict(), "head": head.state_dict(), "config": cfg.model_dump(mode="json")},
        run_dir / "checkpoint.pt",
    )
    if report:
        from training.evaluate.report import write_report

        write_report(run_dir)
    print(f"model repository written to {out} in {summary['seconds']} s; report: {run_dir / 'report.md'}")
    return summary
