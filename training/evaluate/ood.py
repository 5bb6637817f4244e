"""How well the out-of-distribution check of a model repository flags what it should, and only that.

    python -m training.evaluate.ood --repository model_repository --out docs/results/ood.json \
        [--md docs/results/ood.md]

Every image goes through the service's own ``Pipeline`` (decode, clean, ONNX Runtime embedded, the card's
OOD check and naming rule), so the figures are those of the served answers. No torch. Reported, each as the
share of answers flagged (``ood`` true) and named (``view`` set):

- non-ultrasound images (``training.evaluate.ood_set``, built on the fly), overall and by kind; an image the
  service refuses (4xx) carries no view either, so ``flagged_or_refused_share`` is the share caught;
- in distribution: the run's held-out subjects, redrawn from the card's provenance (its ``--data`` specs,
  ``test_fraction`` and ``split_seed``, with ``training.data.readers.read_spec`` and ``subject_split``),
  per source, plus fresh phantoms of the views the run trained on (another seed, new subjects); the run's
  training images are reported apart (``seen_in_training``), as an optimistic bound;
- phantoms of each view the run's phantoms left out (``card.provenance.phantom_views``), which the model
  never saw;
- ``flagged_with_view``: flagged answers that still carry a view name anywhere (must be 0).

The split is redrawn over the subjects of the images that decode and clean here, as the run drew it over the
images it could clean; phantom subjects come from the phantom plan (a phantom always cleans). A ``dicom:``
spec keys its subject hashes with the run's cache folder: pass the same ``--cache-dir``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from service.card import ModelCard
from service.errors import FuscError
from service.pipeline import ClusterResult, Pipeline, load_pipeline
from service.settings import Settings
from training.data.phantoms import VIEWS, PhantomConfig, generate, plan
from training.data.readers import READERS, ImageList, read_spec, subject_split
from training.evaluate.ood_set import read_manifest, write_ood_set

REPO_ROOT = Path(__file__).resolve().parents[2]
BATCH = 32
# Seeds of the evaluation's own phantoms, offset from the run's phantom seed so that no image repeats.
FRESH_SEED_OFFSET = 1000
LEFT_OUT_SEED_OFFSET = 2000

Answer = ClusterResult | FuscError


# ------------------------------------------------------------------------------------------ answering
def answer(pipeline: Pipeline, images: Iterable[bytes | Path], batch: int = BATCH) -> list[Answer]:
    """Each image's answer (or refusal), ``batch`` images per model call; paths are read lazily."""
    out: list[Answer] = []
    chunk: list[bytes] = []
    for item in images:
        chunk.append(item.read_bytes() if isinstance(item, Path) else item)
        if len(chunk) == batch:
            out += pipeline.cluster(chunk)
            chunk = []
    if chunk:
        out += pipeline.cluster(chunk)
    return out


def carries_view(result: ClusterResult) -> bool:
    return result.view is not None or any(t.view is not None for t in result.top)


def summarize(answers: Sequence[Answer]) -> dict:
    """Counts and shares of one set of answers; shares of answers are None when nothing was answered."""
    results = [a for a in answers if isinstance(a, ClusterResult)]
    refused = Counter(a.code for a in answers if isinstance(a, FuscError))
    flagged = sum(bool(r.ood) for r in results)
    named = sum(r.view is not None for r in results)
    n, answered = len(answers), len(results)
    return {
        "n": n,
        "answered": answered,
        "refused": dict(sorted(refused.items())),
        "flagged": flagged,
        "flagged_share": flagged / answered if answered else None,
        "flagged_or_refused_share": (flagged + n - answered) / n if n else None,
        "named": named,
        "named_share": named / answered if answered else None,
        "view_reasons": dict(sorted(Counter(r.view_reason or "named" for r in results).items())),
        "flagged_with_view": sum(bool(r.ood) and carries_view(r) for r in results),
    }


# ---------------------------------------------------------------------------------------------- sets
def phantom_pngs(n: int, seed: int, views: Sequence[str]) -> Iterator[bytes]:
    """``n`` phantoms of ``views`` as PNG bytes, balanced over views, drawn as the run draws its phantoms
    but for subjects of their own: a phantom subject's look comes from its name, so the names are new."""
    cfg = PhantomConfig()
    for i, (view, subject) in enumerate(plan(n, seed, views)):
        ph = generate(np.random.default_rng([seed, i, 2]), view, f"E{seed}-{subject}", cfg)
        ok, buf = cv2.imencode(".png", ph.image)
        if not ok:
            raise RuntimeError("PNG encoding of a phantom failed")
        yield buf.tobytes()


def data_specs(card: ModelCard) -> list[str]:
    """The run's ``--data`` specs; older cards have them only inside the recorded command."""
    if card.provenance.data:
        return list(card.provenance.data)
    words = shlex.split(card.provenance.command) if card.provenance.command else []
    return [b for a, b in zip(words, words[1:], strict=False) if a == "--data"] + [
        w.split("=", 1)[1] for w in words if w.startswith("--data=")
    ]


def resolve_spec(spec: str, bases: Sequence[Path]) -> str | None:
    """``spec`` with its path made absolute against the first of ``bases`` where it exists (the run's
    relative paths were relative to where it ran); None when it exists nowhere."""
    kind, _, path = spec.partition(":") if spec.split(":", 1)[0] in READERS else ("", "", spec)
    candidates = [Path(path)] if Path(path).is_absolute() else [base / path for base in bases]
    for candidate in candidates:
        if candidate.exists():
            return f"{kind}:{candidate.resolve()}" if kind else str(candidate.resolve())
    return None


def in_distribution(
    pipeline: Pipeline, card: ModelCard, *, cache_dir: Path | None, bases: Sequence[Path], batch: int
) -> tuple[dict, dict[str, list[Answer]], dict[str, list[Answer]]]:
    """The split as redrawn, and the answers per real source for held-out and for training subjects."""
    images = ImageList()
    missing: list[str] = []
    for spec in data_specs(card):
        resolved = resolve_spec(spec, bases)
        if resolved is None:
            missing.append(spec)
        else:
            images.extend(read_spec(resolved, cache_dir=cache_dir))
    answers = answer(pipeline, images.paths, batch)
    ok = [isinstance(a, ClusterResult) for a in answers]
    subjects = [s for s, good in zip(images.subjects, ok, strict=True) if good]
    prov = card.provenance
    known_views = [v for v in prov.phantom_views if v in VIEWS] or list(VIEWS)
    if prov.phantoms:
        subjects += [s for _, s in plan(prov.phantoms, prov.phantom_seed, known_views)]
    held_subjects: set[str] = set()
    if prov.test_fraction > 0 and subjects:
        mask = subject_split(subjects, prov.test_fraction, prov.split_seed)
        held_subjects = {s for s, h in zip(subjects, mask, strict=True) if h}
    held: dict[str, list[Answer]] = {}
    seen: dict[str, list[Answer]] = {}
    for a, subject, source in zip(answers, images.subjects, images.sources, strict=True):
        (held if subject in held_subjects else seen).setdefault(source, []).append(a)
    split = {
        "data": data_specs(card),
        "missing": missing,
        "test_fraction": prov.test_fraction,
        "split_seed": prov.split_seed,
        "phantoms": prov.phantoms,
        "phantom_seed": prov.phantom_seed,
        "held_out_subjects": len(held_subjects),
    }
    return split, dict(sorted(held.items())), dict(sorted(seen.items()))


# ------------------------------------------------------------------------------------------ evaluate
def evaluate_ood(
    repository: Path,
    *,
    n_ood: int = 240,
    seed: int = 0,
    n_phantoms: int = 200,
    n_left_out: int = 60,
    ood_dir: Path | None = None,
    cache_dir: Path | None = None,
    batch: int = BATCH,
) -> dict:
    """The whole report as a JSON-ready dict (see the module docstring)."""
    repository = Path(repository)
    pipeline = load_pipeline(Settings(model_repository=repository))
    card = pipeline.card
    prov = card.provenance

    with tempfile.TemporaryDirectory(prefix="fusc-ood-set-") as tmp:
        root = write_ood_set(ood_dir or Path(tmp), n_ood, seed)
        manifest = read_manifest(root)
        ood_answers = answer(pipeline, [path for path, _ in manifest], batch)
    by_kind: dict[str, list[Answer]] = {}
    for (_, kind), a in zip(manifest, ood_answers, strict=True):
        by_kind.setdefault(kind, []).append(a)

    bases = [Path.cwd(), REPO_ROOT]
    split, held, seen = in_distribution(pipeline, card, cache_dir=cache_dir, bases=bases, batch=batch)
    held_answers = [a for group in held.values() for a in group]
    trained_views = [v for v in prov.phantom_views if v in VIEWS] or list(VIEWS)
    fresh_seed = prov.phantom_seed + FRESH_SEED_OFFSET
    fresh = answer(pipeline, phantom_pngs(n_phantoms, fresh_seed, trained_views), batch) if n_phantoms else []

    # A view is left out only when the run had phantoms and said which views they were.
    left_out_views = (
        [v for v in VIEWS if v not in prov.phantom_views] if prov.phantoms and prov.phantom_views else []
    )
    left_seed = prov.phantom_seed + LEFT_OUT_SEED_OFFSET
    left_out = {
        view: answer(pipeline, phantom_pngs(n_left_out, left_seed + i, [view]), batch)
        for i, view in enumerate(left_out_views)
    }

    everything = [*ood_answers, *held_answers, *fresh, *(a for v in left_out.values() for a in v)]
    ood = card.ood
    return {
        "repository": str(repository),
        "model_version": card.version,
        "ood": None
        if ood is None
        else {
            "method": ood.method,
            "k": ood.k if ood.method == "knn_cosine" else None,
            "bank_size": ood.bank.count if ood.bank is not None else None,
            "threshold": ood.threshold,
            "quantile": ood.quantile,
            "calibrated_on": ood.calibrated_on,
        },
        "naming_min_confidence": card.naming.min_confidence,
        "non_ultrasound": {
            "seed": seed,
            "overall": summarize(ood_answers),
            "by_kind": {k: summarize(v) for k, v in sorted(by_kind.items())},
        },
        "in_distribution": {
            "split": split,
            "held_out": {source: summarize(a) for source, a in held.items()},
            "fresh_phantoms": {"seed": fresh_seed, "views": trained_views, **summarize(fresh)},
            "overall": summarize([*held_answers, *fresh]),
            "seen_in_training": {source: summarize(a) for source, a in seen.items()},
        },
        "left_out_views": {
            "trained_views": list(prov.phantom_views),
            "seed": left_seed,
            "by_view": {v: summarize(a) for v, a in left_out.items()},
        },
        "flagged_with_view": summarize(everything)["flagged_with_view"],
    }


# -------------------------------------------------------------------------------------------- report
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def markdown(report: dict) -> str:
    """A short table of the report: one row per set."""
    ood = report["ood"]
    method = (
        "none"
        if ood is None
        else f"{ood['method']} (threshold {ood['threshold']:.4f}, {ood['calibrated_on']})"
    )
    lines = [
        f"# OOD check of model {report['model_version']}",
        "",
        f"OOD method: {method}; a view is named at confidence ≥ {report['naming_min_confidence']}. "
        "Made by `python -m training.evaluate.ood`.",
        "",
        "| set | images | refused | flagged | flagged or refused | named |",
        "|---|---|---|---|---|---|",
    ]

    def row(name: str, s: dict) -> None:
        refused = sum(s["refused"].values())
        lines.append(
            f"| {name} | {s['n']} | {refused} | {_pct(s['flagged_share'])} | "
            f"{_pct(s['flagged_or_refused_share'])} | {_pct(s['named_share'])} |"
        )

    non_us = report["non_ultrasound"]
    row("**non-ultrasound, all**", non_us["overall"])
    for kind, s in non_us["by_kind"].items():
        row(f"non-ultrasound: {kind}", s)
    ind = report["in_distribution"]
    for source, s in ind["held_out"].items():
        row(f"**held out: {source}**", s)
    row("**fresh phantoms** (trained views, new subjects)", ind["fresh_phantoms"])
    for view, s in report["left_out_views"]["by_view"].items():
        row(f"**left-out view: {view}**", s)
    for source, s in ind["seen_in_training"].items():
        row(f"seen in training: {source}", s)
    lines += [
        "",
        f"Flagged answers that still carry a view name: {report['flagged_with_view']}. "
        "Shares of flagged and named answers are of the images answered; refused images (4xx) get no view.",
    ]
    if ind["split"]["missing"]:
        lines.append(f"Data not found here, left out: {', '.join(ind['split']['missing'])}.")
    if not ind["held_out"]:
        lines.append("The run held no subjects out: no held-out real images.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.evaluate.ood",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")
    ap.add_argument("--out", type=Path, required=True, help="the report as JSON")
    ap.add_argument("--md", type=Path, help="also a short markdown table")
    ap.add_argument("--n-ood", type=int, default=240, help="non-ultrasound images (default 240)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the non-ultrasound set")
    ap.add_argument("--phantoms", type=int, default=200, help="fresh phantoms of the trained views")
    ap.add_argument("--left-out", type=int, default=60, help="phantoms of each left-out view")
    ap.add_argument("--ood-dir", type=Path, help="keep the non-ultrasound set here (default: a temp dir)")
    ap.add_argument("--cache-dir", type=Path, help="the run's cache folder (key of dicom: subject hashes)")
    args = ap.parse_args(argv)
    report = evaluate_ood(
        args.repository,
        n_ood=args.n_ood,
        seed=args.seed,
        n_phantoms=args.phantoms,
        n_left_out=args.left_out,
        ood_dir=args.ood_dir,
        cache_dir=args.cache_dir,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
