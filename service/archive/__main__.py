"""``python -m service.archive``: run an archive, rebuild its report, build its similar-image index, query it.

    python -m service.archive run SOURCE --out RUN_DIR [--engine pool|ray] [--workers N] [--limit N] ...
    python -m service.archive status RUN_DIR
    python -m service.archive report RUN_DIR
    python -m service.archive index RUN_DIR [--kind auto|flat|ivfpq]
    python -m service.archive similar IMAGE --run RUN_DIR [-k 10]

SOURCE is a folder tree (images and DICOM files), a .csv/.parquet list of paths, or a DICOMweb base URL
(``http://host:8042/dicom-web``, QIDO filters as ``--qido 'StudyDate=20240101-'``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from service.archive.errors import ArchiveError
from service.errors import FuscError
from service.settings import DEFAULT_MODEL_REPOSITORY, available_cores


def _repo_default() -> Path:
    return Path(os.environ.get("FUSC_MODEL_REPOSITORY") or DEFAULT_MODEL_REPOSITORY)


def _cmd_run(args: argparse.Namespace) -> int:
    from service.archive.run import RunOptions, run_archive
    from service.archive.sources import resolve

    spec = resolve(args.source, qido=args.qido or "", auth=os.environ.get("FUSC_ARCHIVE_DICOMWEB_AUTH"))
    opts = RunOptions(
        out=args.out,
        engine=args.engine,
        workers=args.workers,
        ort_threads=args.ort_threads,
        chunk_size=args.chunk_size,
        limit=args.limit,
        model_repository=args.model_repository,
        precision=args.precision,
        subject_key_file=args.subject_key_file,
        map_method=args.map,
        report=not args.no_report,
        progress=not args.no_progress,
        all_files=args.all_files,
        ray_address=args.address,
        ray_node_ip=args.node_ip_address,
        stop_after_chunks=args.stop_after_chunks,
    )
    manifest = run_archive(spec, opts)
    print(json.dumps({"status": manifest.status, "counts": manifest.counts, "out": str(args.out)}))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from service.archive import store
    from service.archive.ledger import Ledger

    manifest = store.read_manifest(args.run)
    ledger = Ledger(args.run)
    out = {"status": manifest.status, "model_version": manifest.model_version, "counts": manifest.counts}
    if manifest.status != "complete" and ledger.has_plan():
        plan, chunk = ledger.read_plan()
        out["chunks_done"] = len(ledger.done())
        out["chunks"] = ledger.chunk_count(len(plan), chunk)
    print(json.dumps(out, indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from service.archive.report import write_report

    print(write_report(args.run, model_repository=args.model_repository))
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from service.archive.similar import build_index

    meta = build_index(args.run, kind=args.kind)
    print(json.dumps(meta.model_dump(mode="json"), indent=2))
    return 0


def _cmd_similar(args: argparse.Namespace) -> int:
    from service.archive.similar import SimilarIndex
    from service.pipeline import load_pipeline
    from service.settings import Settings

    index = SimilarIndex.load(args.run)
    pipeline = load_pipeline(Settings(model_repository=args.model_repository, precision=args.precision))
    index.check_model(pipeline.card, args.precision)
    (answer,) = pipeline.cluster([Path(args.image).read_bytes()], kind="embed")
    if isinstance(answer, FuscError):
        raise answer
    hits = index.search(answer.embedding, args.k)
    print(json.dumps({"model_version": pipeline.card.version, "neighbours": hits}, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m service.archive", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="cluster a whole archive (resumable: rerun the same command to continue)"
    )
    run.add_argument("source", help="folder, .csv/.parquet list of paths, or DICOMweb base URL")
    run.add_argument("--out", required=True, type=Path, help="the run folder")
    run.add_argument("--engine", choices=("pool", "ray"), default="pool")
    run.add_argument(
        "--workers",
        type=int,
        default=0,
        help=f"worker processes/actors (default: the cores, {available_cores()} here)",
    )
    run.add_argument("--ort-threads", type=int, default=1, help="ONNX Runtime intra-op threads per worker")
    run.add_argument(
        "--chunk-size", type=int, default=128, help="images per chunk (one model call, one commit)"
    )
    run.add_argument("--limit", type=int, default=None, help="only the first N items (in key order)")
    run.add_argument("--model-repository", type=Path, default=_repo_default())
    run.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    run.add_argument("--subject-key-file", type=Path, default=None, help="secret of the subject key hash")
    run.add_argument("--map", choices=("auto", "tsne", "pca", "none"), default="auto", help="2-D map method")
    run.add_argument("--no-report", action="store_true")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--all-files", action="store_true", help="read every file, not only image-like names")
    run.add_argument(
        "--qido", default="", help="DICOMweb: QIDO-RS study filters, e.g. 'ModalitiesInStudy=US'"
    )
    run.add_argument("--address", default=None, help="Ray: the cluster's address (host:port)")
    run.add_argument(
        "--node-ip-address", default=None, help="Ray: this driver's node address (loopback tests)"
    )
    run.add_argument("--stop-after-chunks", type=int, default=None, help=argparse.SUPPRESS)
    run.set_defaults(fn=_cmd_run)

    status = sub.add_parser("status", help="how far a run is")
    status.add_argument("run", type=Path)
    status.set_defaults(fn=_cmd_status)

    report = sub.add_parser("report", help="write report/ of a finished run again")
    report.add_argument("run", type=Path)
    report.add_argument("--model-repository", type=Path, default=None)
    report.set_defaults(fn=_cmd_report)

    index = sub.add_parser("index", help="build the run's similar-image index (faiss)")
    index.add_argument("run", type=Path)
    index.add_argument("--kind", choices=("auto", "flat", "ivfpq"), default="auto")
    index.set_defaults(fn=_cmd_index)

    similar = sub.add_parser("similar", help="the archive images most similar to an image")
    similar.add_argument("image", type=Path)
    similar.add_argument("--run", required=True, type=Path, help="a run folder with an index")
    similar.add_argument("-k", type=int, default=10)
    similar.add_argument("--model-repository", type=Path, default=_repo_default())
    similar.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    similar.set_defaults(fn=_cmd_similar)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except (FuscError, ArchiveError) as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
