"""Label Studio: hand the review's images to the labeling tool with the clusters as pre-annotations, and
read the finished annotations back, through its REST API (plain HTTP: the SDK pins an OpenCV that clashes
with the runtime's).

The images Label Studio shows are the cleaned frames (no burnt-in text), written as PNG files under a
folder that Label Studio serves as local files (``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``); each task
carries the image's key, its cluster and its confidence, and a prediction (the cluster's name, scored with
the confidence) when its cluster has a name.

``run_label_studio`` starts Label Studio from its own venv on 127.0.0.1 with everything that calls home
switched off (tests and local use; ``make labelstudio-venv`` builds the venv); ``python -m
service.review.labelstudio`` (``make labelstudio``) does so from the command line, with credentials made
once and kept in its data folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import httpx

from service.localserver import free_port, stop_process_group
from service.review.images import ImageStore
from service.review.state import Review
from service.taxonomy import VIEWS

FROM_NAME = "view"
TO_NAME = "image"


def label_config() -> str:
    """One single-choice question over the taxonomy's views, the image beside it."""
    choices = "\n".join(
        f"    <Choice value={quoteattr(v.name)} hint={quoteattr(v.title)}/>" for v in VIEWS.values()
    )
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


class LabelStudioError(RuntimeError):
    """Label Studio answered with an error, or could not be reached."""


@dataclass
class LabelStudio:
    """A Label Studio server reached at ``url`` with an access token (legacy ``Token`` scheme)."""

    url: str
    token: str
    timeout_s: float = 60.0

    def _client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url.rstrip("/"),
            headers={"Authorization": f"Token {self.token}"},
            timeout=self.timeout_s,
        )

    def _call(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            with self._client() as c:
                r = c.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise LabelStudioError(f"Label Studio at {self.url} could not be reached: {exc}") from exc
        if r.status_code >= 400:
            raise LabelStudioError(
                f"Label Studio answered {r.status_code} to {method} {path}: {r.text[:300]}"
            )
        return r

    def ready(self) -> bool:
        try:
            with self._client() as c:
                return c.get("/api/projects", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def create_project(self, title: str, description: str = "") -> int:
        r = self._call(
            "POST",
            "/api/projects",
            json={"title": title, "description": description, "label_config": label_config()},
        )
        return int(r.json()["id"])

    def add_local_storage(self, project: int, path: Path, title: str = "fusc review images") -> int:
        """Let the project read files under ``path`` (which must lie under Label Studio's document root)."""
        r = self._call(
            "POST",
            "/api/storages/localfiles",
            json={"project": project, "title": title, "path": str(path), "use_blob_urls": False},
        )
        return int(r.json()["id"])

    def import_tasks(self, project: int, tasks: list[dict]) -> int:
        r = self._call("POST", f"/api/projects/{project}/import", json=tasks)
        return int(r.json().get("task_count", len(tasks)))

    def tasks(self, project: int) -> list[dict]:
        out: list[dict] = []
        page = 1
        while True:
            r = self._call(
                "GET",
                "/api/tasks",
                params={"project": project, "fields": "all", "page": page, "page_size": 500},
            )
            body = r.json()
            batch = body["tasks"] if isinstance(body, dict) else body
            out.extend(batch)
            total = body.get("total", len(out)) if isinstance(body, dict) else len(out)
            if not batch or len(out) >= total:
                return out
            page += 1

    def annotate(self, task: int, view: str) -> int:
        """Make an annotation through the API (what a labeler's click does): the task is ``view``."""
        result = [
            {"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [view]}}
        ]
        r = self._call("POST", f"/api/tasks/{task}/annotations", json={"result": result})
        return int(r.json()["id"])

    def export(self, project: int) -> list[dict]:
        r = self._call("GET", f"/api/projects/{project}/export", params={"exportType": "JSON"})
        return r.json()


def _choice(result: list[dict]) -> str | None:
    for item in result or []:
        if item.get("from_name") == FROM_NAME and item.get("type") == "choices":
            choices = item.get("value", {}).get("choices") or []
            if choices:
                return choices[0]
    return None


def make_tasks(
    review: Review, images: ImageStore, rows: Sequence[int], root: Path, folder: str
) -> list[dict]:
    """Tasks for ``rows``: the cleaned frame written to ``root/folder/<image id>.png`` and served by Label
    Studio as a local file; a prediction from the cluster's name, scored with the image's confidence."""
    target = Path(root) / folder
    target.mkdir(parents=True, exist_ok=True)
    tasks = []
    model = f"fusc-{review.run.manifest.model_version}-review"
    for row in rows:
        iid = review.ids[row]
        png = images.get(row, iid, "clean")
        (target / f"{iid}.png").write_bytes(png)
        label = review.label_of(row)
        conf = float(review.confidence[row])
        task: dict = {
            "data": {
                "image": f"/data/local-files/?d={folder}/{iid}.png",
                "image_id": iid,
                "key": review.keys[row],
                "cluster": int(review.rc[row]),
                "confidence": round(conf, 4),
            }
        }
        if label.view:
            score = 1.0 if label.source in ("image", "labelstudio") else conf
            task["predictions"] = [
                {
                    "model_version": model,
                    "score": round(score, 4),
                    "result": [
                        {
                            "from_name": FROM_NAME,
                            "to_name": TO_NAME,
                            "type": "choices",
                            "value": {"choices": [label.view]},
                            "score": round(score, 4),
                        }
                    ],
                }
            ]
        tasks.append(task)
    return tasks


def push(
    review: Review,
    images: ImageStore,
    ls: LabelStudio,
    rows: Sequence[int],
    *,
    root: Path,
    title: str,
    batch: int = 500,
) -> dict:
    """Create a project, let it read the images, import one task per row. Returns project id and counts."""
    project = ls.create_project(title, f"fusc review of model {review.run.manifest.model_version}")
    folder = f"fusc-review-{project}"
    tasks = make_tasks(review, images, rows, root, folder)
    ls.add_local_storage(project, Path(root) / folder)
    imported = 0
    for start in range(0, len(tasks), batch):
        imported += ls.import_tasks(project, tasks[start : start + batch])
    predicted = sum(1 for t in tasks if t.get("predictions"))
    return {"project": project, "tasks": imported, "with_predictions": predicted, "folder": folder}


def pull(ls: LabelStudio, project: int) -> tuple[dict[str, str], list[str]]:
    """The finished annotations of ``project``: {image key: view} (the latest annotation of each task that
    was not cancelled) and the annotators' ids."""
    labels: dict[str, str] = {}
    who: set[str] = set()
    for task in ls.export(project):
        done = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        if not done:
            continue
        latest = max(done, key=lambda a: (a.get("updated_at") or "", a.get("id", 0)))
        view = _choice(latest.get("result", []))
        key = task.get("data", {}).get("key")
        if view in VIEWS and key:
            labels[key] = view
            who.add(str(latest.get("completed_by", "")))
    return labels, sorted(who)


# ------------------------------------------------------------------------------------------ the server


def quiet_env(data_dir: Path, document_root: Path, token: str, user: str, password: str) -> dict[str, str]:
    """Label Studio's environment: its own data folder, a fixed admin and token, local files served from
    ``document_root``, and nothing that calls home (Sentry, analytics, version check)."""
    return {
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": user,
        "LABEL_STUDIO_PASSWORD": password,
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
    }


@contextlib.contextmanager
def run_label_studio(
    venv: Path,
    data_dir: Path,
    document_root: Path,
    *,
    token: str,
    user: str = "review@fusc.local",
    password: str,
    port: int | None = None,
    log: Path | None = None,
    ready_timeout_s: float = 300.0,
) -> Iterator[LabelStudio]:
    """Label Studio from ``venv`` on 127.0.0.1 until the block ends (its whole process group is stopped)."""
    exe = Path(venv) / "bin" / "label-studio"
    if not exe.exists():
        raise LabelStudioError(f"no Label Studio in {venv}: build it with `make labelstudio-venv`")
    port = port or free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "FUSC_"))},
        **quiet_env(Path(data_dir), Path(document_root), token, user, password),
    }
    cmd = [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir)]
    with open(log, "wb") if log else open(os.devnull, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    ls = LabelStudio(f"http://127.0.0.1:{port}", token)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not ls.ready():
            if proc.poll() is not None:
                raise LabelStudioError(f"Label Studio exited with code {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise LabelStudioError(f"Label Studio was not ready after {ready_timeout_s:.0f} s")
            time.sleep(1.0)
        yield ls
    finally:
        stop_process_group(proc, term_wait_s=20.0, kill_wait_s=10.0)


def credentials(data_dir: Path) -> dict[str, str]:
    """The admin user, password and API token of the Label Studio kept in ``data_dir``: made once (random,
    in ``fusc-credentials.json``, readable by its owner only) and the same at every later start."""
    path = Path(data_dir) / "fusc-credentials.json"
    if path.exists():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    creds = {
        "user": "review@fusc.local",
        "password": secrets.token_urlsafe(18),
        "token": secrets.token_hex(20),
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f)
    return creds


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m service.review.labelstudio``: Label Studio for the review, on 127.0.0.1, until stopped."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m service.review.labelstudio",
        description="Start Label Studio (from its own venv) on 127.0.0.1 for the review app, nothing calling "
        "home, until Ctrl-C or SIGTERM.",
    )
    ap.add_argument("--venv", type=Path, default=Path(".venv-labelstudio"))
    ap.add_argument(
        "--data-dir", type=Path, default=Path("runs/labelstudio"), help="its database and uploads"
    )
    ap.add_argument(
        "--files-root",
        type=Path,
        default=None,
        help="LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, the review's --labelstudio-root "
        "(default DATA_DIR/files)",
    )
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args(argv)
    files_root = (args.files_root or args.data_dir / "files").resolve()
    files_root.mkdir(parents=True, exist_ok=True)
    creds = credentials(args.data_dir)

    def _stop(signum, frame):  # SIGTERM ends the block below, which stops Label Studio's process group
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        with run_label_studio(
            args.venv,
            args.data_dir.resolve(),
            files_root,
            token=creds["token"],
            user=creds["user"],
            password=creds["password"],
            port=args.port,
            log=args.data_dir / "labelstudio.log",
        ) as ls:
            print(
                f"Label Studio on {ls.url} (user {creds['user']}; password and API token in "
                f"{args.data_dir / 'fusc-credentials.json'}). For the review app:\n"
                f"  FUSC_LABELSTUDIO_URL={ls.url} FUSC_LABELSTUDIO_ROOT={files_root} "
                f"FUSC_LABELSTUDIO_TOKEN=<token> python -m service.review RUN_DIR",
                flush=True,
            )
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except LabelStudioError as exc:
        print(f"fusc labelstudio: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
