"""Load (slow: about 8 minutes): capacity, 80 % of it, and five minutes at twice it, against a real
``bentoml serve`` on real images (HC18 and FETAL_PLANES_DB when the shared data folder is there).

Needs: the project venv, a free loopback port, a machine not busy with other work (the p99 / p50 ratio
measures queueing, and a neighbour taking the CPU adds its own). Run: ``pytest -m slow
tests/integration/test_load.py``; ``python -m benchmarks.load`` gives the same figures as JSON.
"""

from __future__ import annotations

import pytest

from benchmarks import load

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_overload_is_shed_and_steady_load_keeps_a_short_tail() -> None:
    result = load.run(repo_name="tiny", capacity_s=30.0, steady_s=60.0, overload_s=300.0)
    print(result)
    assert result["capacity"]["images_per_s"] > 0
    over = result["at_2x"]
    assert over["only_200_or_503"], over["statuses"]
    assert over["503_with_retry_after"] == over["statuses"].get("503", 0)
    assert over["rss_growth"] < 0.10, over["rss_mib"]
    assert result["at_80_percent"]["only_200_or_503"]
    assert result["at_80_percent"]["p99_over_p50"] <= 3.0, result["at_80_percent"]
    assert result["ready_after"]
