"""Evaluate a running (or self-started) fusc service on a labelled image set, against k-means on raw pixels.

    python -m training.evaluate.service --data csv:../shared/data/fetal_planes_db [--url http://127.0.0.1:3000]

Without ``--url`` it starts the real BentoML server on a free loopback port with ``--model-repository``
and stops it at the end. Labels are read only here, for scoring; the service never sees them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import numpy as np
from sklearn.cluster import KMeans

from service.decode import decode_image
from service.examples import serve
from training.data.readers import read_spec
from training.evaluate.metrics import cluster_metrics, raw_pixels

REPO_ROOT = Path(__file__).resolve().parents[2]


def cluster_via_service(url: str, paths: list[Path], chunk: int = 16) -> list[int | None]:
    """Post the images to ``/v1/cluster/batch``; returns each image's cluster (None where it was refused)."""
    out: list[int | None] = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(0, len(paths), chunk):
            files = [
                ("images", (f"image{j}", p.read_bytes(), "application/octet-stream"))
                for j, p in enumerate(paths[i : i + chunk])
            ]
            resp = client.post("/v1/cluster/batch", files=files)
            resp.raise_for_status()
            out += [r.get("cluster") if "error" not in r else None for r in resp.json()["results"]]
    return out


def evaluate_service(url: str, data: str, seed: int = 0, baseline_seeds: int = 10) -> dict:
    """The served clusters of a labelled set against its labels, beside k-means on raw pixels with the same
    K over ``baseline_seeds`` seeds (mean ± std and each seed's figures: one seed can be far from typical).

    ``transductive`` says whether the served model's card lists this data set among its training data (it
    then saw these images, without labels, while it learned)."""
    images = read_spec(data)
    keep = [i for i, lab in enumerate(images.labels) if lab]
    paths = [images.paths[i] for i in keep]
    labels = np.array([images.labels[i] for i in keep])
    model = httpx.get(f"{url}/v1/model", timeout=10).json()
    k = int(model["num_clusters"])
    clusters = cluster_via_service(url, paths)
    served = np.array([c is not None for c in clusters])
    pred = np.array([c if c is not None else -1 for c in clusters])
    pixels = raw_pixels(decode_image(p.read_bytes()) for p in paths)
    raw_runs = [
        cluster_metrics(
            KMeans(n_clusters=min(k, len(paths)), n_init=10, random_state=seed + s).fit_predict(pixels),
            labels,
        )
        for s in range(baseline_seeds)
    ]
    raw_mean = {m: float(np.mean([r[m] for r in raw_runs])) for m in raw_runs[0]}
    raw_std = {
        m: float(np.std([r[m] for r in raw_runs], ddof=1)) if len(raw_runs) > 1 else 0.0 for m in raw_runs[0]
    }
    source = data.split(":", 1)[-1]
    trained_on = model.get("provenance", {}).get("data", [])
    transductive = any(
        Path(spec.split(":", 1)[-1]).resolve() == Path(source).resolve() for spec in trained_on
    )
    classes, counts = np.unique(labels, return_counts=True)
    return {
        "data": data,
        "n_images": len(paths),
        "n_refused": int((~served).sum()),
        "classes": {str(c): int(n) for c, n in zip(classes, counts, strict=True)},
        "model_version": model.get("version"),
        "k": k,
        "transductive": transductive,
        "service": cluster_metrics(pred[served], labels[served]),
        "kmeans_raw_pixels": raw_mean,
        "kmeans_raw_pixels_std": raw_std,
        "kmeans_raw_pixels_seeds": raw_runs,
        "cluster_sizes": {str(c): int(n) for c, n in zip(*np.unique(pred, return_counts=True), strict=True)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.evaluate.service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--data", required=True, help="labelled set, kind:path (csv | fpdb)")
    ap.add_argument("--url", help="base URL of a running service; default: start one")
    ap.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    ap.add_argument("--out", type=Path, help="write the result JSON here too")
    args = ap.parse_args(argv)
    if args.url:
        result = evaluate_service(args.url, args.data)
    else:
        with serve(args.model_repository) as url:
            result = evaluate_service(url, args.data)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
