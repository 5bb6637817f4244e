"""End to end in a real browser: Debian's headless chromium driven by Selenium against the review app
started on 127.0.0.1 (``python -m service.review``) over phantoms clustered by the archive command.

Open a cluster, name it, merge two clusters, mark an outlier, undo a decision, accept, export; the labels
CSV (fetched by the browser) and the new model card say so; a restarted app shows the same state.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import httpx
import pytest

from service.card import load_card
from tests.review.conftest import copy_repository, review_server

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
        )
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


def _css(driver, selector):
    return driver.find_element("css selector", selector)


def _go(driver, selector) -> None:
    """Click what ``selector`` finds and wait for the page it leads to (a form post, a link)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    # A mark on the old page's window object: a new document starts without it. (Waiting for the old <html>
    # element to go stale races with Chromium, which may answer "node does not belong to the document".)
    driver.execute_script("window.__fuscOldPage = true")
    _css(driver, selector).click()
    WebDriverWait(driver, 30, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(
            "return window.__fuscOldPage === undefined && document.readyState === 'complete'"
        )
    )


def _select(driver, selector, value):
    from selenium.webdriver.support.ui import Select

    Select(_css(driver, selector)).select_by_value(str(value))


def _fits(driver) -> None:
    """Nothing wider than the 1280 px window."""
    width = driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= 1280, f"{driver.current_url} is {width} px wide"


def _images_loaded(driver) -> None:
    broken = driver.execute_script(
        "return Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0).length"
    )
    assert broken == 0


def test_review_in_a_real_browser(phantom_run, browser, tmp_path):
    repo = copy_repository(tmp_path / "repo")
    state = tmp_path / "state"
    log = tmp_path / "app.log"
    with review_server(phantom_run.run, state=state, repository=repo, log=log) as app:
        clusters = sorted(httpx.get(app.url + "/state.json").json()["clusters"], key=lambda c: -c["size"])
        a, b, c = (x["id"] for x in clusters[:3])
        d = browser
        d.get(app.url + "/")
        assert "Clusters" in d.title
        _fits(d)

        # Open cluster a, name it "abdomen".
        _go(d, f"#cluster-{a} h2 a")
        assert d.current_url.endswith(f"/cluster/{a}")
        _images_loaded(d)
        _fits(d)
        _select(d, "#name-view", "abdomen")
        _go(d, "#name-go")
        assert _css(d, "#cluster-name").text == "abdomen"
        assert "named cluster" in _css(d, "#flash").text

        # Least confident first, then mark the least confident image an outlier.
        _go(d, "#least-first")
        tile = _css(d, "figure.tile")
        outlier_id = tile.get_attribute("data-id")
        tile.find_element("css selector", "input[type=checkbox]").click()
        _go(d, "#mark-outlier")
        assert "outlier for 1 image" in _css(d, "#flash").text
        assert "st-outlier" in _css(d, f'figure.tile[data-id="{outlier_id}"]').get_attribute("class")

        # The image page of that image: both pictures and the neighbours load.
        _go(d, f'figure.tile[data-id="{outlier_id}"] a')
        assert "outlier" in _css(d, "#image-label").text
        _images_loaded(d)
        _fits(d)

        # Merge cluster b into a from the overview.
        d.get(app.url + "/")
        _select(d, "#merge-source", b)
        _select(d, "#merge-target", a)
        _go(d, "#merge-go")
        assert "merged cluster" in _css(d, "#flash").text
        assert not d.find_elements("css selector", f"#cluster-{b}")
        assert f"merged: {b}" in _css(d, f"#cluster-{a}").text

        # Name c, then take it back with "Undo last".
        d.get(app.url + f"/cluster/{c}")
        _select(d, "#name-view", "femur")
        _go(d, "#name-go")
        assert _css(d, "#cluster-name").text == "femur"
        _go(d, "#undo-last")
        assert _css(d, "#cluster-name").text == "unnamed"

        # Accept a (name & accept).
        d.get(app.url + f"/cluster/{a}")
        _select(d, "#name-view", "abdomen")
        _go(d, "#name-accept")
        assert _css(d, "#accepted").text == "accepted"

        # Export: a new model card version, and the labels CSV as the browser downloads it.
        d.get(app.url + "/export")
        old_version = _css(d, "#card-version").text
        _go(d, "#publish")
        assert "model card" in _css(d, "#flash").text
        new_version = _css(d, "#card-version").text
        assert new_version == f"{old_version}+review.1"
        text = d.execute_async_script(
            "const done = arguments[0]; fetch('/export/labels.csv').then(r => r.text()).then(done);"
        )
        rows = {r["image_id"]: r for r in csv.DictReader(io.StringIO(text))}
        in_a = [r for r in rows.values() if r["review_cluster"] == str(a)]
        assert {r["cluster"] for r in in_a} == {str(a), str(b)}  # b's images are in a now
        assert rows[outlier_id]["status"] == "outlier" and rows[outlier_id]["view"] == ""
        others = [r for r in in_a if r["image_id"] != outlier_id]
        assert {(r["view"], r["status"]) for r in others} == {("abdomen", "accepted")}
        assert {r["view"] for r in rows.values() if r["review_cluster"] == str(c)} == {""}
        card = load_card(repo)
        assert card.version == new_version
        assert card.cluster_names[a] == card.cluster_names[b] == "abdomen"
        decisions_before = httpx.get(app.url + "/state.json").json()["decisions"]

    # A restarted app over the same state folder shows the same review.
    with review_server(phantom_run.run, state=state, repository=repo, log=log) as app:
        d.get(app.url + f"/cluster/{a}")
        assert _css(d, "#cluster-name").text == "abdomen"
        assert _css(d, "#accepted").text == "accepted"
        d.get(app.url + f"/cluster/{a}?order=least")
        assert "st-outlier" in _css(d, f'figure.tile[data-id="{outlier_id}"]').get_attribute("class")
        d.get(app.url + "/")
        assert not d.find_elements("css selector", f"#cluster-{b}")
        d.get(app.url + "/decisions")
        assert "undone by" in _css(d, "table.log").text
        assert httpx.get(app.url + "/state.json").json()["decisions"] == decisions_before
        text = d.execute_async_script(
            "const done = arguments[0]; fetch('/export/labels.csv').then(r => r.text()).then(done);"
        )
        again = {r["image_id"]: r for r in csv.DictReader(io.StringIO(text))}
        assert again == rows
    assert Path(state / "decisions.sqlite").is_file()
