"""Stage checkpoints of a run and their resumption: one file per finished stage, an epoch snapshot while a
stage runs, the random state each leaves, and the checks that a resumed run is the interrupted one."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from training.config import TrainConfig
from training.loop import checkpoint_due

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
