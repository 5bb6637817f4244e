"""Memory under large uploads (slow: about 2 minutes): 32 concurrent 49 MB 7000x7000 PNGs, then 200 of them at
concurrency 32, against a real ``bentoml serve`` with its default settings.

Needs: the project venv, a free loopback port, ~5 GB of loopback traffic. Run: ``pytest -m slow
tests/integration/test_memory.py``; ``python -m benchmarks.memory`` gives the same figures as JSON.
"""

from __future__ import annotations

import pytest

from benchmarks import memory

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_large_uploads_stay_under_1_5_gib_and_answer_200_or_503() -> None:
    result = memory.run(concurrency=32, uploads=200, side=7000, repo_name="tiny")
    print(result)
    assert result["image"]["bytes"] > 45e6
    for phase in ("wave", "steady"):
        assert result[phase]["only_200_or_503_with_retry_after"], result[phase]
        assert result[phase]["statuses"].get("200", 0) > 0, result[phase]  # admission lets work through
    assert result["rss_mib"]["peak_overall"] <= 1536, result["rss_mib"]
    assert result["ready_after"] and result["small_image_after"] == 200
