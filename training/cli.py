"""Command line of the offline package: ``train`` (a full run into a model repository) and ``phantoms``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="SSL backbone + FUSC cluster head, exported to a model repository")
    t.add_argument(
        "--preset", default="cpu-small", help="smoke | cpu-small (default) | cpu-small-scratch | gpu-paper"
    )
    t.add_argument("--config", type=Path, help="JSON file merged over the preset")
    t.add_argument(
        "--data",
        action="append",
        default=[],
        help="kind:path, repeatable; kinds: csv (labels.csv), csv-fine (brain sub-plane labels from a "
        "brain_plane column), fpdb (published FETAL_PLANES_DB), fpdb-fine (brain sub-planes as labels), "
        "folder (images, unlabelled), dicom (every DICOM file under the folder; labels from labels.csv in it "
        "or <folder>.csv beside it, optional; subjects are keyed hashes of PatientID/StudyInstanceUID)",
    )
    t.add_argument("--phantoms", type=int, help="add this many generated phantom images")
    t.add_argument(
        "--phantom-views",
        nargs="+",
        metavar="VIEW",
        help="generate only these phantom views (default all); a view left out is one the model never sees, "
        "for testing out-of-distribution flags",
    )
    t.add_argument("--method", choices=["simclr", "barlowtwins", "dino"], help="SSL method")
    t.add_argument(
        "--backbone",
        help="efficientnet-lite0 | efficientnet-lite1 | efficientnet-lite2 | resnet18 | resnet18-half "
        "| resnet18-quarter "
        "| vit-small-16 | vit-tiny-16 | vit-tiny-8 "
        "| vit-micro-8",
    )
    t.add_argument(
        "--init",
        choices=["imagenet", "scratch"],
        help="imagenet: start from the backbone's ImageNet weights (efficientnet-lite*), adapted by SSL; "
        "scratch: random initialisation",
    )
    t.add_argument("--clusters", type=int, help="number of clusters K")
    t.add_argument(
        "--overcluster",
        type=int,
        metavar="K",
        help="also train head-only over-clustering heads with K clusters (e.g. 120) and report them beside "
        "the main K (paper Table 3)",
    )
    t.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="run the whole pipeline once per seed (same held-out subjects) into RUN_DIR/seed-N and write "
        "mean ± std of every metric to RUN_DIR/report.md/.html and RUN_DIR/seeds.json; --out gets the "
        "first seed's model",
    )
    t.add_argument(
        "--split-seed",
        type=int,
        help="seed that draws the held-out subjects (default: --seed, or the first of --seeds), so runs with "
        "other seeds can share one split",
    )
    t.add_argument(
        "--coarse-map",
        type=Path,
        help="JSON {fine label: coarse view} merged over the default map, for the merged-view tables "
        "(paper Table 2)",
    )
    t.add_argument(
        "--ssl-epochs",
        type=int,
        help="SSL epochs; 0 with --init imagenet uses the pretrained features as they are",
    )
    t.add_argument("--cluster-epochs", type=int)
    t.add_argument("--size", type=int, help="model input side in pixels")
    t.add_argument("--test-fraction", type=float, help="share of subjects held out for inductive evaluation")
    t.add_argument("--name-clusters-from-labels", action="store_true", default=None)
    t.add_argument("--version", help="model version written into the card")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--cache-dir", type=Path, help="where cleaned frames and generated phantoms are cached")
    t.add_argument("--out", type=Path, default=Path("model_repository"))
    t.add_argument(
        "--run-dir",
        type=Path,
        default=Path("runs/latest"),
        help="report, outputs and checkpoints (RUN_DIR/checkpoints/<stage>.pt once a stage ends, "
        "<stage>-epoch.pt while it runs)",
    )
    t.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="N",
        help="within a stage, checkpoint after every N-th epoch (default 1; 0: only when the stage ends)",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in RUN_DIR from its last checkpoint (a finished stage, or an "
        "epoch within the unfinished one); the options must give the same configuration as the "
        "interrupted run (else refused)",
    )
    t.add_argument(
        "--stop-after",
        metavar="STAGE[:EPOCH]",
        help="stop once the checkpoint of this stage (ssl, cluster, selflabel, overcluster), or of its "
        "EPOCH-th epoch (e.g. ssl:2), is written (exit status 3); continue later with --resume",
    )
    t.add_argument("--no-report", action="store_true", help="skip report.md/report.html and their plots")

    args, rest = parser.parse_known_args(argv)
    if args.cmd == "train":
        if rest:
            parser.error(f"unrecognised arguments: {' '.join(rest)}")
        from training.config import build_config
        from training.run import RunStopped, check_stop_after, run

        overrides = {
            "data": args.data or None,
            "phantoms": args.phantoms,
            "phantom_views": args.phantom_views,
            "seed": args.seed,
            "seeds": args.seeds,
            "split_seed": args.split_seed,
            "coarse_map": args.coarse_map,
            "threads": args.threads,
            "device": args.device,
            "version": args.version,
            "test_fraction": args.test_fraction,
            "cache_dir": args.cache_dir,
            "checkpoint_every": args.checkpoint_every,
            "name_clusters_from_labels": args.name_clusters_from_labels,
            "clean": {"size": args.size} if args.size else None,
            "ssl": {
                k: v
                for k, v in {
                    "epochs": args.ssl_epochs,
                    "method": args.method,
                    "backbone": args.backbone,
                    "init": args.init,
                }.items()
                if v is not None
            }
            or None,
            "cluster": {
                k: v
                for k, v in {
                    "num_clusters": args.clusters,
                    "epochs": args.cluster_epochs,
                    "overcluster": args.overcluster,
                }.items()
                if v is not None
            }
            or None,
        }
        cfg = build_config(args.preset, args.config, **overrides)
        try:
            check_stop_after(cfg, args.stop_after)
        except ValueError as err:
            parser.error(f"--stop-after: {err}")
        try:
            run(
                cfg,
                args.out,
                args.run_dir,
                command="python -m training " + shlex.join(argv),
                resume=args.resume,
                stop_after=args.stop_after,
                report=not args.no_report,
            )
        except RunStopped as stop:
            print(stop)
            return 3
    return 0
