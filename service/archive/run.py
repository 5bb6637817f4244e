"""Drive one archive run: plan it (or pick up its frozen plan), compute the missing chunks on an engine,
commit each as it comes, then consolidate into the finished run folder (service.archive.store), with the
2-D map, the summary and the HTML report.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from service.archive import store
from service.archive.errors import LedgerError
from service.archive.ledger import Ledger
from service.archive.map2d import map_2d
from service.archive.sources import SourceSpec, list_source, resolve
from service.archive.subjects import SubjectHasher, subject_hasher
from service.archive.worker import WorkerConfig
from service.card import CARD_FILENAME, load_card, sha256_file
from service.settings import DEFAULT_MODEL_REPOSITORY, Settings, available_cores

DEFAULT_CHUNK = 128


@dataclass
class RunOptions:
    out: Path
    engine: str = "pool"  # pool | ray
    workers: int = 0  # 0: every available core (pool), every CPU of the cluster (ray)
    ort_threads: int = 1  # per worker: workers x threads = the cores, no oversubscription
    chunk_size: int = DEFAULT_CHUNK
    limit: int | None = None
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    precision: str = "fp32"
    subject_key_file: Path | None = None
    map_method: str = "auto"
    report: bool = True
    progress: bool = True
    all_files: bool = False
    ray_address: str | None = None
    ray_node_ip: str | None = None
    max_upload_bytes: int = Settings().max_upload_bytes
    max_pixels: int = Settings().max_pixels
    # Stop after this many chunks of this session (tests and benchmarks: a run interrupted on purpose).
    stop_after_chunks: int | None = None
    extra: dict = field(default_factory=dict)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_resume(
    manifest: store.RunManifest, spec: SourceSpec, card_sha: str, hasher: SubjectHasher, opts
) -> None:
    problems = []
    if manifest.card_sha256 != card_sha:
        problems.append(
            f"it was started with model {manifest.model_version} (card {manifest.card_sha256[:12]}…), "
            f"this command uses card {card_sha[:12]}…"
        )
    if manifest.source != spec.described:
        problems.append(f"it reads {manifest.source}, not {spec.described}")
    if manifest.extra.get("subject_key_fingerprint") != hasher.fingerprint:
        problems.append("it was started with another subject key secret")
    if manifest.extra.get("limit") != opts.limit:
        problems.append(f"it was planned with --limit {manifest.extra.get('limit')}")
    if manifest.extra.get("precision", "fp32") != opts.precision:
        problems.append(f"it runs at precision {manifest.extra.get('precision')}")
    if problems:
        raise LedgerError(
            f"{opts.out} holds an unfinished run that this command cannot continue: "
            + "; ".join(problems)
            + ". Rerun it as it was started, or give another --out."
        )


def _plan(ledger: Ledger, spec: SourceSpec, hasher: SubjectHasher, opts: RunOptions, card, card_sha: str):
    say(f"listing {spec.described} …")
    t0 = time.perf_counter()
    listing = list_source(spec, hasher, all_files=opts.all_files, skip=opts.out)
    table = listing.table
    if opts.limit is not None:
        table = table.slice(0, opts.limit)
    if len(table) == 0:
        raise LedgerError(f"the source {spec.described} lists no images")
    ledger.write_plan(table, opts.chunk_size)
    left = ", ".join(f"{n} ({why})" for why, n in sorted(listing.left_out.items()))
    say(
        f"planned {len(table)} images in {time.perf_counter() - t0:.1f} s"
        + (f"; left out: {left}" if left else "")
    )
    manifest = store.RunManifest(
        model_version=card.version,
        card_sha256=card_sha,
        model_repository=str(Path(opts.model_repository).resolve()),
        source=spec.described,
        source_root=spec.root,
        engine=opts.engine,
        counts={"items": len(table)},
        embedding_dim=card.embedding_dim,
        extra={
            "chunk_size": opts.chunk_size,
            "limit": opts.limit,
            "precision": opts.precision,
            "backbone_sha256": card.backbone_for(opts.precision).sha256,
            "source_kind": spec.kind,
            "left_out": listing.left_out,
            "subject_key_fingerprint": hasher.fingerprint,
            "subject_key_origin": hasher.origin,
            "sessions": [],
            **opts.extra,
        },
    )
    store.write_manifest(opts.out, manifest)
    return manifest


def _engine(opts: RunOptions, cfg: WorkerConfig, chunks, session: dict):
    if opts.engine == "ray":
        from service.archive.ray_engine import run_ray

        return run_ray(
            cfg,
            chunks,
            workers=opts.workers,
            address=opts.ray_address,
            node_ip=opts.ray_node_ip,
            stats=session,
        )
    if opts.engine != "pool":
        raise ValueError(f"unknown engine {opts.engine!r}: pool or ray")
    from service.archive.engines import run_inline, run_pool

    workers = opts.workers or available_cores()
    return run_inline(cfg, chunks) if workers == 1 else run_pool(cfg, chunks, workers)


def run_archive(source: str | SourceSpec, opts: RunOptions) -> store.RunManifest:
    """Run (or continue) the archive run in ``opts.out``; returns its manifest (status "running" when the
    session stopped early on purpose, "complete" otherwise)."""
    spec = resolve(source) if isinstance(source, str) else source
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out)
    ledger.lock()
    try:
        return _run_locked(spec, opts, ledger)
    finally:
        ledger.unlock()


def _run_locked(spec: SourceSpec, opts: RunOptions, ledger: Ledger) -> store.RunManifest:
    out = Path(opts.out)
    repo = Path(opts.model_repository)
    card = load_card(repo, verify=True)
    card_sha = sha256_file(repo / CARD_FILENAME)
    manifest: store.RunManifest | None = None
    if (out / store.MANIFEST).is_file():
        manifest = store.read_manifest(out)
        if manifest.status == "complete":
            ledger.remove_parts()
            say(f"the run in {out} is complete ({manifest.counts}); nothing to do")
            return manifest
    hasher = subject_hasher(out, opts.subject_key_file)
    if manifest is not None:
        _check_resume(manifest, spec, card_sha, hasher, opts)
    if manifest is None or not ledger.has_plan():
        say(f"subject keys: HMAC-SHA-256 with {hasher.origin}")
        manifest = _plan(ledger, spec, hasher, opts, card, card_sha)
    plan, chunk_size = ledger.read_plan()
    if chunk_size != opts.chunk_size:
        say(f"this run was planned in chunks of {chunk_size}; continuing with those")
    ledger.clean_temporaries()
    n_chunks = ledger.chunk_count(len(plan), chunk_size)
    done = ledger.done()
    pending = [i for i in range(n_chunks) if i not in done]
    done_items = sum(min(chunk_size, len(plan) - i * chunk_size) for i in done if i < n_chunks)
    if done:
        say(f"resuming: {len(done)} of {n_chunks} chunks ({done_items} images) were done before")
    cfg = WorkerConfig(
        model_repository=str(repo.resolve()),
        precision=opts.precision,
        ort_threads=opts.ort_threads,
        source=spec,
        secret=hasher.secret,
        max_upload_bytes=opts.max_upload_bytes,
        max_pixels=opts.max_pixels,
    )
    if opts.stop_after_chunks is not None:
        pending = pending[: opts.stop_after_chunks]
    session = {
        "started": datetime.now(timezone.utc).isoformat(),
        "engine": opts.engine,
        "workers": opts.workers or (available_cores() if opts.engine == "pool" else 0),
        "ort_threads": opts.ort_threads,
        "chunks_before": len(done),
    }
    t0 = time.perf_counter()
    processed = 0
    bar = tqdm(
        total=len(plan),
        initial=done_items,
        unit="img",
        desc="archive",
        disable=not opts.progress,
        smoothing=0.1,
    )
    try:
        if pending:
            for index, part in _engine(opts, cfg, ledger.chunks(plan, chunk_size, pending), session):
                ledger.commit(index, part)
                if not processed:  # workers started and models loaded: the rest is the steady rate
                    session["first_part_s"] = round(time.perf_counter() - t0, 3)
                    session["first_part_images"] = len(part)
                processed += len(part)
                bar.update(len(part))
    finally:
        bar.close()
        seconds = time.perf_counter() - t0
        session.update(images=processed, seconds=round(seconds, 3))
        session["images_per_s"] = round(processed / seconds, 2) if seconds > 0 and processed else None
        if processed and seconds > session.get("first_part_s", seconds):
            steady = (processed - session["first_part_images"]) / (seconds - session["first_part_s"])
            session["steady_images_per_s"] = round(steady, 2)
        manifest = store.read_manifest(out)
        if pending:
            manifest.extra.setdefault("sessions", []).append(session)
            store.write_manifest(out, manifest)
    if len(ledger.done()) < n_chunks:
        say(f"stopped with {len(ledger.done())} of {n_chunks} chunks done; rerun to continue")
        return manifest
    return finish(out, plan, chunk_size, card, opts, ledger, spec)


def finish(
    out: Path,
    plan: pa.Table,
    chunk_size: int,
    card,
    opts: RunOptions,
    ledger: Ledger,
    spec: SourceSpec | None = None,
) -> store.RunManifest:
    say("consolidating …")
    emb_tmp = out / ("." + store.EMBEDDINGS + ".tmp")
    table = ledger.consolidate(plan, chunk_size, emb_tmp, card.embedding_dim)
    emb = np.load(emb_tmp, mmap_mode="r")
    t0 = time.perf_counter()
    xy, method = map_2d(emb, opts.map_method)
    say(f"2-D map ({method}) of {len(emb)} embeddings in {time.perf_counter() - t0:.1f} s")
    emb_rows = table.column("embedding_row")
    answered = emb_rows.is_valid().to_numpy(zero_copy_only=False)
    idx = pc.drop_null(emb_rows).to_numpy()
    map_x = np.full(len(table), np.nan, np.float32)
    map_y = np.full(len(table), np.nan, np.float32)
    map_x[answered], map_y[answered] = xy[idx, 0], xy[idx, 1]
    missing = ~answered | np.isnan(map_x)
    table = table.append_column("map_x", pa.array(map_x, pa.float32(), mask=missing))
    table = table.append_column("map_y", pa.array(map_y, pa.float32(), mask=missing))
    store.write_results_table(out, table)
    os.replace(emb_tmp, out / store.EMBEDDINGS)
    manifest = store.read_manifest(out)
    errors = table.column("error_code")
    answered_n = int(errors.null_count)  # an answered item is one without an error code
    manifest.counts = {"items": len(table), "answered": answered_n, "errors": len(table) - answered_n}
    manifest.counts["ood"] = int(
        pc.sum(pc.fill_null(table.column("ood"), False).cast(pa.int64())).as_py() or 0
    )
    manifest.map_method = method
    manifest.status = "complete"
    manifest.finished = datetime.now(timezone.utc)
    store.write_manifest(out, manifest)
    ledger.remove_parts()
    say(
        f"done: {manifest.counts['items']} images, {manifest.counts['answered']} answered, "
        f"{manifest.counts['errors']} errors → {out}"
    )
    if opts.report:
        from service.archive.report import write_report

        write_report(out, model_repository=Path(opts.model_repository), spec=spec)
    return manifest
