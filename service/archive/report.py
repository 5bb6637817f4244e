"""What a person reads after a run: ``report/summary.json`` and ``summary.md`` (cluster sizes, OOD share,
errors by code, throughput) and ``report/index.html`` (the 2-D map, and each cluster's most and least
confident images as cleaned thumbnails: burnt-in text removed by service.clean, no file names shown).

Plain HTML with inline CSS, the map drawn with OpenCV: nothing to install, nothing fetched from anywhere.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from service.archive import store
from service.archive.errors import SourceReadError
from service.archive.sources import Reader, SourceSpec
from service.card import load_card
from service.clean import clean_frame
from service.decode import decode_image
from service.errors import FuscError

REPORT_DIR = "report"
THUMB_SIDE = 128
PER_SIDE = 6  # thumbnails per cluster and end (most / least confident)
MAP_SIDE = 900

# 18 colours that stay apart on white (Tableau 20 without its two greys, as RGB), cycled for K > 18; the
# out-of-distribution images are drawn as black crosses.
_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138),
    (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229),
]  # fmt: skip


def colour(cluster: int) -> tuple[int, int, int]:
    return _PALETTE[cluster % len(_PALETTE)]


def spec_of(manifest: store.RunManifest) -> SourceSpec:
    """The run's source as far as the manifest tells (DICOMweb credentials are never stored)."""
    kind = manifest.extra.get("source_kind", "folder")
    return SourceSpec(kind=kind, root=manifest.source_root, described=manifest.source)


def summarize(run: store.Run) -> dict[str, Any]:
    t = run.table
    m = run.manifest
    n = len(t)
    answered = t.filter(pc.is_null(t.column("error_code")))
    errors = Counter(c for c in t.column("error_code").to_pylist() if c is not None)
    clusters: list[dict[str, Any]] = []
    cl = answered.column("cluster").to_numpy()
    conf = answered.column("confidence").to_numpy()
    ood = np.asarray(pc.fill_null(answered.column("ood"), False).to_numpy(zero_copy_only=False), bool)
    views = answered.column("view").to_pylist()
    for c in sorted(set(cl.tolist())):
        sel = cl == c
        named = Counter(v for v, s in zip(views, sel, strict=True) if s and v)
        clusters.append(
            {
                "cluster": int(c),
                "images": int(sel.sum()),
                "share": round(float(sel.sum()) / max(1, len(cl)), 4),
                "mean_confidence": round(float(conf[sel].mean()), 4),
                "ood_share": round(float(ood[sel].mean()), 4),
                "view": named.most_common(1)[0][0] if named else None,
            }
        )
    sessions = m.extra.get("sessions", [])
    timed = [s for s in sessions if s.get("images")]
    return {
        "model_version": m.model_version,
        "card_sha256": m.card_sha256,
        "source_kind": m.extra.get("source_kind"),
        "engine": m.engine,
        "created": m.created.isoformat(),
        "finished": m.finished.isoformat() if m.finished else None,
        "counts": {"items": n, "answered": len(answered), "errors": n - len(answered)},
        "ood_share": round(float(ood.mean()) if len(ood) else 0.0, 4),
        "errors_by_code": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
        "clusters": clusters,
        "map_method": m.map_method,
        "left_out_at_listing": m.extra.get("left_out", {}),
        "sessions": sessions,
        "images_per_s": (
            round(sum(s["images"] for s in timed) / sum(s["seconds"] for s in timed), 2) if timed else None
        ),
        "subject_keys": len(set(v for v in t.column("subject_key").to_pylist() if v)),
    }


def summary_markdown(s: dict[str, Any]) -> str:
    c = s["counts"]
    lines = [
        "# Archive run summary",
        "",
        f"Model {s['model_version']} (card `{s['card_sha256'][:12]}…`), engine {s['engine']}, "
        f"source kind {s['source_kind']}, finished {s['finished']}.",
        "",
        f"- images: {c['items']}; answered {c['answered']}; errors {c['errors']}",
        f"- out of distribution (of answered): {100 * s['ood_share']:.1f} %",
        f"- subjects (keyed hashes): {s['subject_keys']}",
        f"- throughput: {s['images_per_s']} images/s over {len(s['sessions'])} session(s)",
        f"- 2-D map: {s['map_method']}",
        "",
        "## Clusters",
        "",
        "| cluster | view | images | share | mean confidence | OOD share |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for k in s["clusters"]:
        lines.append(
            f"| {k['cluster']} | {k['view'] or '—'} | {k['images']} | {100 * k['share']:.1f} % | "
            f"{k['mean_confidence']:.3f} | {100 * k['ood_share']:.1f} % |"
        )
    lines += ["", "## Errors by code", "", "| code | images |", "|---|---:|"]
    lines += [f"| `{code}` | {n} |" for code, n in s["errors_by_code"].items()] or ["| (none) | 0 |"]
    lines += [
        "",
        "## Sessions",
        "",
        "| started | engine | workers | images | seconds | images/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for x in s["sessions"]:
        lines.append(
            f"| {x['started']} | {x['engine']} | {x['workers']} | {x['images']} | {x['seconds']} | "
            f"{x.get('images_per_s')} |"
        )
    return "\n".join(lines) + "\n"


def draw_map(t: pa.Table, path: Path) -> None:
    x = t.column("map_x").to_numpy(zero_copy_only=False).astype(np.float64)
    y = t.column("map_y").to_numpy(zero_copy_only=False).astype(np.float64)
    cl = t.column("cluster").to_numpy(zero_copy_only=False)
    ood = np.asarray(pc.fill_null(t.column("ood"), False).to_numpy(zero_copy_only=False), bool)
    ok = ~(np.isnan(x) | np.isnan(y))
    img = np.full((MAP_SIDE, MAP_SIDE, 3), 255, np.uint8)
    if ok.any():
        lo = np.array([x[ok].min(), y[ok].min()])
        span = np.maximum(np.array([x[ok].max(), y[ok].max()]) - lo, 1e-9)
        px = ((x - lo[0]) / span[0] * (MAP_SIDE - 40) + 20).round()
        py = ((y - lo[1]) / span[1] * (MAP_SIDE - 40) + 20).round()
        order = np.random.default_rng(0).permutation(np.flatnonzero(ok))  # no cluster drawn over the rest
        for i in order[~ood[order]]:
            r, g, b = colour(int(cl[i]))
            cv2.circle(img, (int(px[i]), int(py[i])), 2, (b, g, r), -1, cv2.LINE_AA)
        for i in order[ood[order]]:  # on top, so that they can be seen
            cv2.drawMarker(img, (int(px[i]), int(py[i])), (0, 0, 0), cv2.MARKER_CROSS, 5, 1)
        for c in np.unique(cl[ok].astype(int)):
            sel = ok & (cl == c) & ~ood
            if sel.any():
                cx, cy = int(np.median(px[sel])), int(np.median(py[sel]))
                cv2.putText(
                    img, str(c), (cx, cy), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 4, cv2.LINE_AA
                )
                cv2.putText(img, str(c), (cx, cy), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)


def _thumb(reader: Reader, source: str, cfg) -> np.ndarray | None:
    try:
        frame = decode_image(reader.read(source))
        return clean_frame(frame, cfg)
    except (FuscError, SourceReadError):
        return None


def write_report(root: Path, *, model_repository: Path | None = None, spec: SourceSpec | None = None) -> Path:
    """report/ of a finished run; thumbnails are re-read from the source and cleaned as the model saw them."""
    root = Path(root)
    run = store.load_run(root)
    out = root / REPORT_DIR
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    for old in (out / "thumbs").glob("*.png"):
        old.unlink()
    s = summarize(run)
    (out / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(s))
    draw_map(run.table, out / "map.png")
    repo = Path(model_repository or run.manifest.model_repository)
    cfg = load_card(repo, verify=False).preprocess.model_copy(update={"size": THUMB_SIDE})
    reader = Reader(spec or spec_of(run.manifest), max_bytes=64 * 2**20)
    t = run.table.append_column("row", pa.array(np.arange(len(run.table)), pa.int64()))
    answered = t.filter(pc.is_null(t.column("error_code")))
    e = html.escape
    c = s["counts"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>fusc archive run</title>",
        "<style>body{font:14px/1.45 system-ui,sans-serif;margin:1.5rem auto;max-width:72rem;padding:0 1rem;"
        "color:#222}table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.15em .5em;"
        "text-align:right}th{background:#f4f4f4}figure{display:inline-block;margin:2px;text-align:center;"
        "font-size:11px}figure img{display:block;width:96px;height:96px;image-rendering:pixelated}"
        ".sw{display:inline-block;width:.9em;height:.9em;vertical-align:middle;border-radius:2px}"
        "h2{border-bottom:1px solid #ddd;margin-top:1.8rem}.row{white-space:nowrap;overflow-x:auto}"
        "</style></head><body>",
        "<h1>Archive run</h1>",
        f"<p>Model <b>{e(s['model_version'])}</b>, engine {e(s['engine'])}, source kind "
        f"{e(str(s['source_kind']))}, finished {e(str(s['finished']))}. <b>{c['items']}</b> images: "
        f"{c['answered']} answered, {c['errors']} errors; {100 * s['ood_share']:.1f} % of the answered "
        f"out of distribution; {s['subject_keys']} subjects (keyed hashes); "
        f"{s['images_per_s']} images/s.</p>",
        "<p>Thumbnails are the cleaned frames the model saw (burnt-in text and markers inpainted); an image "
        "is named by its row in <code>results.parquet</code>, never by its file name.</p>",
        f"<h2>2-D map ({e(s['map_method'])})</h2><p>Each dot an answered image, coloured by cluster; black "
        "crosses: out of distribution.</p>"
        "<img src='map.png' width='600' height='600' alt='2-D map of the embeddings'>",
        "<h2>Clusters</h2><table><tr><th>cluster</th><th>view</th><th>images</th><th>share</th>"
        "<th>mean confidence</th><th>OOD share</th></tr>",
    ]
    for k in s["clusters"]:
        r, g, b = colour(k["cluster"])
        parts.append(
            f"<tr><td><span class='sw' style='background:rgb({r},{g},{b})'></span> {k['cluster']}</td>"
            f"<td>{e(k['view'] or '—')}</td><td>{k['images']}</td><td>{100 * k['share']:.1f} %</td>"
            f"<td>{k['mean_confidence']:.3f}</td><td>{100 * k['ood_share']:.1f} %</td></tr>"
        )
    parts.append("</table><h2>Errors by code</h2><table><tr><th>code</th><th>images</th></tr>")
    for code, n in s["errors_by_code"].items():
        parts.append(f"<tr><td><code>{e(code)}</code></td><td>{n}</td></tr>")
    parts.append("</table>")
    try:
        for k in s["clusters"]:
            sel = answered.filter(pc.equal(answered.column("cluster"), k["cluster"]))
            ranked = sel.sort_by([("confidence", "descending"), ("key", "ascending")])
            ends = {
                "most confident": ranked.slice(0, PER_SIDE),
                "least confident": ranked.slice(max(0, len(ranked) - PER_SIDE)).sort_by("confidence"),
            }
            parts.append(
                f"<h2>Cluster {k['cluster']} — {e(k['view'] or 'unnamed')} ({k['images']} images)</h2>"
            )
            for label, rows in ends.items():
                parts.append(f"<p>{label}</p><div class='row'>")
                for item in rows.to_pylist():
                    img = _thumb(reader, item["source"], cfg)
                    if img is None:
                        continue
                    name = f"thumbs/c{k['cluster']:02d}_r{item['row']}.png"
                    cv2.imwrite(str(out / name), img)
                    flag = " OOD" if item["ood"] else ""
                    parts.append(
                        f"<figure><img src='{name}' alt='row {item['row']}'>row {item['row']}<br>"
                        f"p={item['confidence']:.2f}{flag}</figure>"
                    )
                parts.append("</div>")
    finally:
        reader.close()
    parts.append("</body></html>")
    (out / "index.html").write_text("".join(parts))
    return out
