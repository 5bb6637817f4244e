"""Against a real Label Studio (its own venv, started on 127.0.0.1): the review's images go in as tasks
with the clusters as pre-annotations (predictions with scores), an annotation made through Label Studio's
API comes back as a label of the review.

Slow (the first start of Label Studio sets up its database, about a minute on 2 cores). Build its venv
with ``make labelstudio-venv`` (``.venv-labelstudio``, or set FUSC_LABELSTUDIO_VENV).
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from service.localserver import stop_process_group
from service.review.app import ReviewConfig, create_app
from service.review.labelstudio import FROM_NAME, LabelStudio, credentials, free_port
from tests.review.conftest import REPO_ROOT, copy_repository, make_phantom_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

VENV = Path(os.environ.get("FUSC_LABELSTUDIO_VENV", REPO_ROOT / ".venv-labelstudio"))


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """Label Studio as a user starts it: ``python -m service.review.labelstudio`` (``make labelstudio``)."""
    if not (VENV / "bin" / "label-studio").exists():
        pytest.skip(f"no Label Studio venv at {VENV}: build it with `make labelstudio-venv`")
    root = tmp_path_factory.mktemp("labelstudio")
    data, docs, port = root / "data", root / "documents", free_port()
    cmd = [sys.executable, "-m", "service.review.labelstudio", "--venv", str(VENV), "--data-dir", str(data)]
    cmd += ["--files-root", str(docs), "--port", str(port)]
    out = open(root / "cli.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while b"Label Studio on " not in (root / "cli.log").read_bytes():
            assert proc.poll() is None, (root / "cli.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "Label Studio was not ready after 300 s"
            time.sleep(1.0)
        creds = credentials(data)
        assert (data / "fusc-credentials.json").stat().st_mode & 0o077 == 0  # its owner's only
        ls = LabelStudio(f"http://127.0.0.1:{port}", creds["token"])
        assert ls.ready()
        # No secret in what the command prints.
        printed = (root / "cli.log").read_text(errors="replace")
        assert creds["token"] not in printed and creds["password"] not in printed
        yield ls, docs
    finally:
        stop_process_group(proc, term_wait_s=40.0)
        out.close()
    assert proc.returncode == 0, (root / "cli.log").read_text(errors="replace")
    assert not LabelStudio(f"http://127.0.0.1:{port}", "x").ready()  # stopped with the command


def test_tasks_with_pre_annotations_in_and_an_annotation_back(label_studio, tmp_path):
    ls, docs = label_studio
    pr = make_phantom_run(tmp_path, 120, seed=9)
    app = create_app(
        ReviewConfig(
            run_dir=pr.run,
            state_dir=tmp_path / "state",
            model_repository=copy_repository(tmp_path / "repo"),
            labelstudio_url=ls.url,
            labelstudio_token=ls.token,
            labelstudio_root=docs,
        )
    )
    client = TestClient(app)
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/").text).group(1)
    review = app.state.review.review
    named = sorted(review.clusters(), key=lambda s: -s.size)[:3]
    for s in named:
        client.post("/action/name", data={"csrf": csrf, "cluster": s.id, "view": "brain"})
    # Push every image through the app's own button.
    r = client.post("/action/labelstudio-push", data={"csrf": csrf, "scope": "all", "next": "/export"})
    assert r.status_code == 200 and "120 tasks" in r.text, r.text[-500:]
    (project,) = app.state.review.projects()
    tasks = ls.tasks(project["id"])
    assert len(tasks) == 120
    with_pred = [t for t in tasks if t["predictions"]]
    assert len(with_pred) == sum(s.size for s in named)
    pred = with_pred[0]["predictions"][0]
    row = review.row_of_key[with_pred[0]["data"]["key"]]
    assert pred["result"][0]["value"]["choices"] == ["brain"]
    assert pred["score"] == pytest.approx(float(review.confidence[row]), abs=1e-4)
    assert pred["result"][0]["from_name"] == FROM_NAME
    # Label Studio serves the cleaned frame of a task.
    img = httpx.get(ls.url + tasks[0]["data"]["image"], headers={"Authorization": f"Token {ls.token}"})
    assert img.status_code == 200 and img.content[:4] == b"\x89PNG"

    # A labeler's answer, made through Label Studio's API, on an image without a prediction.
    bare = next(t for t in tasks if not t["predictions"])
    ls.annotate(bare["id"], "femur")
    r = client.post("/action/labelstudio-pull", data={"csrf": csrf, "project": project["id"], "next": "/"})
    assert "1 labels read back" in r.text
    rows = {x["key"]: x for x in csv.DictReader(io.StringIO(client.get("/export/labels.csv").text))}
    got = rows[bare["data"]["key"]]
    assert (got["view"], got["label_source"], got["status"]) == ("femur", "labelstudio", "labelled")
    assert "read 1 labels back from labelstudio" in client.get("/decisions").text
