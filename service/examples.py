"""Worked examples from the real service: ``python -m service.examples readme`` rewrites the README's answer.

    python -m service.examples readme [--repository model_repository] [--image PATH] [--check]

It starts ``bentoml serve service.api:FuscService`` on a free loopback port with the given model repository,
waits for ``/readyz``, posts the image to ``/v1/cluster`` and writes the answer (numbers rounded for reading,
timings as they came) and a sentence on why it names a view or not between the README's
``<!-- example-answer:start -->`` and ``<!-- example-answer:end -->`` markers. ``--check`` only compares
(everything but the timings) and exits 1 when the README is stale. ``serve`` is also what the evaluation
scripts use to start a server of their own. No torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from service.localserver import run_service

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
EXAMPLE_IMAGE = REPO_ROOT.parent / "shared" / "data" / "hc18" / "images" / "train_100_2HC.png"
START, END = "<!-- example-answer:start -->", "<!-- example-answer:end -->"
DIGITS = 3  # probabilities, confidence and OOD score as the README shows them
TIMING_DIGITS = 1


# ---------------------------------------------------------------------------------------------- server
@contextlib.contextmanager
def serve(model_repository: Path, timeout: float = 90.0) -> Iterator[str]:
    """Start the real service on 127.0.0.1 (``service.localserver``) and yield its base URL."""
    with run_service(model_repository, ready_timeout_s=timeout) as running:
        yield running.url


def ask(url: str, image: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the /v1/cluster answer for ``image``, the /v1/model card) from the service at ``url``."""
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post(
            "/v1/cluster", files={"image": ("image", image.read_bytes(), "application/octet-stream")}
        )
        r.raise_for_status()
        model = client.get("/v1/model")
        model.raise_for_status()
    return r.json(), model.json()


# ------------------------------------------------------------------------------------------ formatting
def rounded(value: Any, digits: int = DIGITS) -> Any:
    """``value`` with every float rounded to ``digits``, as the README shows it."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def for_reading(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer as the README shows it: numbers rounded, timings to a tenth of a millisecond."""
    out = rounded({k: v for k, v in answer.items() if k != "timings_ms"})
    if "timings_ms" in answer:
        out["timings_ms"] = rounded(answer["timings_ms"], TIMING_DIGITS)
    return out


def without_timings(answer: dict[str, Any]) -> dict[str, Any]:
    """What must match between the README and a fresh answer: everything but the timings."""
    return rounded({k: v for k, v in answer.items() if k != "timings_ms"})


def format_answer(answer: dict[str, Any]) -> str:
    """The answer as a compact JSON block, one line per group of fields, each top cluster on its own."""
    a = for_reading(answer)

    def fields(keys: Sequence[str]) -> str:
        return ", ".join(f"{json.dumps(k)}: {json.dumps(a[k], ensure_ascii=False)}" for k in keys if k in a)

    head = ["cluster", "confidence", "view", "view_reason"]
    tail = [k for k in a if k not in (*head, "top", "timings_ms")]  # ood, ood_score, model_version, new ones
    lines = ["{" + fields(head) + ","]
    top = [json.dumps(t, ensure_ascii=False) for t in a.get("top", [])]
    for i, t in enumerate(top):
        prefix = ' "top": [' if i == 0 else " " * 9
        lines.append(prefix + t + ("]," if i == len(top) - 1 else ","))
    lines.append(" " + fields(tail) + ("," if "timings_ms" in a else "}"))
    if "timings_ms" in a:
        lines.append(" " + fields(["timings_ms"]) + "}")
    return "\n".join(lines)


def describe(answer: dict[str, Any], model: dict[str, Any]) -> str:
    """One paragraph on the answer: whose it is, and why it names a view or not."""
    bar = model.get("naming", {}).get("min_confidence")
    rule = f"a view is named only for an answer in distribution, of a named cluster, at least {bar} confident"
    reason = answer.get("view_reason")
    cluster, confidence = answer["cluster"], round(answer["confidence"], DIGITS)
    if reason is None:
        why = f"It names the view {json.dumps(answer['view'])}: {rule}, and this one is all three"
    elif reason == "out_of_distribution":
        threshold = (model.get("ood") or {}).get("threshold")
        shown = round(threshold, DIGITS) if threshold is not None else "its calibration"
        why = (
            f"`view` is null because the image was flagged out of distribution (`ood_score` under the card's "
            f"threshold of {shown}; no runner-up is named either): {rule}"
        )
    elif reason == "cluster_unnamed":
        why = f"`view` is null because its top cluster, {cluster}, has no name: {rule}"
    else:
        why = f"`view` is null because its confidence, {confidence}, is under the card's bar: {rule}"
    version = answer.get("model_version")
    return (
        f"(The real answer of the bundled demonstration model, version {version}, for this head image, "
        f"written by `make readme-example`; timings vary from run to run. {why}; `view_reason` says which "
        "condition failed. See the model's limits below.)"
    )


def render_block(answer: dict[str, Any], model: dict[str, Any]) -> str:
    # Wrapped as the README's prose is, at 110 columns.
    sentence = textwrap.fill(describe(answer, model), width=110, break_on_hyphens=False)
    return f"{START}\n```json\n{format_answer(answer)}\n```\n\n{sentence}\n{END}"


_BLOCK = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
_JSON = re.compile(r"```json\n(.*?)\n```", re.DOTALL)


def readme_block(text: str) -> tuple[dict[str, Any], str]:
    """(the answer in the README's example block, the whole block); ValueError without the markers."""
    match = _BLOCK.search(text)
    if match is None:
        raise ValueError(f"the README has no {START} ... {END} block")
    block = match.group(0)
    body = _JSON.search(block)
    if body is None:
        raise ValueError("the README's example block holds no ```json block")
    return json.loads(body.group(1)), block


def rewrite_readme(text: str, answer: dict[str, Any], model: dict[str, Any]) -> str:
    readme_block(text)  # the markers must be there: never append a second copy
    return _BLOCK.sub(lambda _: render_block(answer, model), text, count=1)


# ------------------------------------------------------------------------------------------------- CLI
def readme(repository: Path, image: Path, readme_path: Path, check: bool) -> int:
    if not image.is_file():
        print(f"{image} is absent: the example needs the shared HC18 images", file=sys.stderr)
        return 2
    with serve(repository) as url:
        answer, model = ask(url, image)
    text = readme_path.read_text()
    shown, _ = readme_block(text)
    if check:
        if without_timings(shown) != without_timings(answer):
            print(f"{readme_path} shows another answer; run `make readme-example`", file=sys.stderr)
            print(format_answer(answer))
            return 1
        print(f"{readme_path}: the example answer is current")
        return 0
    readme_path.write_text(rewrite_readme(text, answer, model))
    print(format_answer(answer))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m service.examples",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="example", required=True)
    r = sub.add_parser("readme", help="rewrite the README's example answer from the real service")
    r.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")
    r.add_argument("--image", type=Path, default=EXAMPLE_IMAGE)
    r.add_argument("--readme", type=Path, default=README)
    r.add_argument("--check", action="store_true", help="only compare; exit 1 when the README is stale")
    args = ap.parse_args(argv)
    return readme(args.repository, args.image, args.readme, args.check)


if __name__ == "__main__":
    raise SystemExit(main())
