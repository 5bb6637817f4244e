"""The README's example answer is what a fresh server on the bundled model answers today (timings aside)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.card import CARD_FILENAME
from service.examples import (
    EXAMPLE_IMAGE,
    README,
    describe,
    format_answer,
    readme_block,
    render_block,
    rewrite_readme,
    without_timings,
)
from tests.integration.conftest import BUNDLED_REPOSITORY, start_server

TIMEOUT = httpx.Timeout(60.0)


def test_block_round_trips_through_the_readme() -> None:
    answer = {
        "cluster": 1,
        "confidence": 0.987654,
        "top": [{"cluster": 1, "probability": 0.987654, "view": "brain"}],
        "view": "brain",
        "view_reason": None,
        "ood": False,
        "ood_score": 0.91234,
        "model_version": "x",
        "timings_ms": {"decode": 1.26, "clean": 2.0, "embed": 0.04, "assign": 0.01},
    }
    model = {"naming": {"min_confidence": 0.9}}
    text = f"before\n{render_block({**answer, 'cluster': 0}, model)}\nafter\n"
    rewritten = rewrite_readme(text, answer, model)
    shown, block = readme_block(rewritten)
    assert rewritten.startswith("before\n") and rewritten.endswith("\nafter\n")
    assert without_timings(shown) == without_timings(answer)
    assert shown["confidence"] == 0.988 and shown["timings_ms"]["decode"] == 1.3
    assert format_answer(answer) in block and "It names the view" in block
    with pytest.raises(ValueError):
        rewrite_readme("no markers here", answer, model)


@pytest.mark.integration
def test_readme_example_answer_is_current(tmp_path: Path) -> None:
    if not EXAMPLE_IMAGE.is_file():
        pytest.skip(f"{EXAMPLE_IMAGE} is absent: the shared data folder is missing")
    if not (BUNDLED_REPOSITORY / CARD_FILENAME).is_file():
        pytest.skip("model_repository/ holds no model card")
    shown, block = readme_block(README.read_text())
    for server in start_server(BUNDLED_REPOSITORY, tmp_path):
        r = httpx.post(
            f"{server.url}/v1/cluster",
            files={"image": ("image", EXAMPLE_IMAGE.read_bytes(), "application/octet-stream")},
            timeout=TIMEOUT,
        )
        model = httpx.get(f"{server.url}/v1/model", timeout=TIMEOUT).json()
    assert r.status_code == 200, r.text
    fresh = r.json()
    assert set(shown) == set(fresh), "the README's answer has other fields: run `make readme-example`"
    assert without_timings(shown) == without_timings(fresh), "the README is stale: run `make readme-example`"
    # The sentence under the block is regenerated from the same answer and card.
    assert " ".join(describe(fresh, model).split()) in " ".join(block.split())
