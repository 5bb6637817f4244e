"""How many review decisions turn a run's clusters into correct labels: a simulated reviewer drives the real
review app over phantoms whose true views the app never sees.

For each seed: phantoms of the bundled model's seven views (optionally the unseen cervix as well) are
clustered by the archive command with the bundled model; ``python -m service.review`` serves the run on
127.0.0.1; the reviewer takes every decision through the app's own forms (HTTP POST, as the browser does)
and the labels are read from the app's labels CSV after each decision.

The simulated reviewer looks at what a cluster page shows: its first page most confident first and its
first page least confident first (60 images each; every image of a cluster of up to 120). It recognises the
view of each image it looks at (that is where the hidden true label is used, and only for those images).
If one view holds at least ``--purity`` of what it saw, it names the cluster so and accepts it ("Name &
accept": one decision); otherwise, while the budget allows, it splits the cluster in two (one decision) and
looks at both parts again; a cluster it may no longer split is named after its majority. It never marks
single images. Budget: K + 20 decisions (K = the model's clusters). The score is the share of all images
whose exported label is their true view (an image without a label counts as wrong).

    python -m benchmarks.review_naming --seeds 1 2 3 --n 600 --out docs/results/review \\
        [--screenshots docs/screenshots]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from service.card import load_card
from service.localserver import free_port
from service.review.state import image_id

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "model_repository"
BUNDLED_VIEWS = ("brain", "abdomen", "femur", "thorax_4ch", "spine", "profile", "kidneys")
PAGE = 60


def make_run(work: Path, n: int, seed: int, views: tuple[str, ...]) -> tuple[Path, Path, dict[str, str]]:
    from training.data.phantoms import generate_dataset

    data = generate_dataset(work / "phantoms", n, views=views, seed=seed, progress=False)
    with open(data / "labels.csv") as f:
        truth = {r["filename"]: r["label"] for r in csv.DictReader(f)}
    repo = work / "model_repository"
    shutil.copytree(BUNDLED, repo, ignore=shutil.ignore_patterns("fusc_backbone_int8"))
    cmd = [
        sys.executable, "-m", "service.archive", "run", str(data / "images"), "--out", str(work / "run"),
        "--model-repository", str(repo), "--workers", "1", "--no-report", "--no-progress", "--map", "auto",
    ]  # fmt: skip
    subprocess.run(
        cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    return work / "run", repo, truth


@contextlib.contextmanager
def serve(run: Path, state: Path, repo: Path):
    port = free_port()
    cmd = [
        sys.executable, "-m", "service.review", str(run), "--port", str(port), "--state", str(state),
        "--model-repository", str(repo), "--user", "simulated-reviewer",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/state.json", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


class Reviewer:
    """Takes decisions through the app's forms; knows the views of the images it is shown."""

    def __init__(self, url: str, truth: dict[str, str], purity: float, budget: int) -> None:
        self.c = httpx.Client(base_url=url, timeout=120)
        self.truth_by_id = {image_id(k): v for k, v in truth.items()}
        self.truth = truth
        self.purity = purity
        self.budget = budget
        self.csrf = re.search(r'name="csrf" value="([^"]+)"', self.c.get("/").text).group(1)
        self.curve: list[dict] = []
        self.record("start")

    def state(self) -> dict:
        return self.c.get("/state.json").json()

    def post(self, action: str, **data) -> None:
        r = self.c.post(
            f"/action/{action}", data={"csrf": self.csrf, "next": "/", **data}, follow_redirects=False
        )
        assert r.status_code == 303, r.text
        assert "err=" not in r.headers["location"], r.headers["location"]
        self.record(action)

    def labels(self) -> list[dict]:
        return list(csv.DictReader(io.StringIO(self.c.get("/export/labels.csv").text)))

    def record(self, action: str) -> None:
        rows = self.labels()
        correct = sum(1 for r in rows if r["view"] and r["view"] == self.truth.get(r["key"]))
        labelled = sum(1 for r in rows if r["view"])
        self.curve.append(
            {"decisions": self.state()["decisions"], "action": action, "correct": correct / len(rows),
             "labelled": labelled / len(rows)}
        )  # fmt: skip

    def seen(self, cluster: int) -> list[str]:
        """The views of the images the cluster's two first pages show (both orders)."""
        ids: list[str] = []
        for order in ("confident", "least"):
            html = self.c.get(f"/cluster/{cluster}", params={"order": order}).text
            ids += re.findall(r'<figure class="tile[^"]*" data-id="([0-9a-f]+)"', html)
        return [self.truth_by_id[i] for i in dict.fromkeys(ids)]

    def review(self) -> None:
        queue = [c["id"] for c in sorted(self.state()["clusters"], key=lambda c: -c["size"])]
        while queue:
            cid = queue.pop(0)
            views = Counter(self.seen(cid))
            view, n = views.most_common(1)[0]
            share = n / sum(views.values())
            used = self.state()["decisions"]
            # A split costs one decision now and one more name later: keep one decision per cluster left.
            can_split = used + len(queue) + 3 <= self.budget and sum(views.values()) >= 8
            if share < self.purity and can_split:
                before = {c["id"] for c in self.state()["clusters"]}
                self.post("split", cluster=cid)
                new = [c["id"] for c in self.state()["clusters"] if c["id"] not in before]
                queue[:0] = [cid, *new]
                continue
            self.post("accept", cluster=cid, view=view)


def run_seed(
    seed: int, n: int, views: tuple[str, ...], purity: float, work: Path, shots: Path | None
) -> dict:
    run, repo, truth = make_run(work, n, seed, views)
    k = load_card(repo).num_clusters
    budget = k + 20
    with serve(run, work / "state", repo) as url:
        reviewer = Reviewer(url, truth, purity, budget)
        filled = len(reviewer.state()["clusters"])
        reviewer.review()
        rows = reviewer.labels()
        decisions = reviewer.state()["decisions"]
        if shots is not None:
            screenshots(url, shots)
    correct = sum(1 for r in rows if r["view"] and r["view"] == truth[r["key"]])
    # Naming every head cluster after its majority, no split: what naming alone reaches on this run.
    heads: dict[str, Counter] = {}
    for r in rows:
        heads.setdefault(r["cluster"], Counter())[truth[r["key"]]] += 1
    majority = sum(c.most_common(1)[0][1] for c in heads.values()) / len(rows)
    return {
        "seed": seed,
        "images": len(rows),
        "views": list(views),
        "K": k,
        "filled_clusters": filled,
        "budget": budget,
        "decisions": decisions,
        "correct": correct / len(rows),
        "labelled": sum(1 for r in rows if r["view"]) / len(rows),
        "naming_head_clusters_by_majority": majority,
        "splits": sum(1 for p in reviewer.curve if p["action"] == "split"),
        "curve": reviewer.curve,
    }


def _save(driver, path: Path) -> None:
    """The window as a 256-colour PNG: the pages are mostly gray, and a third of the size is enough."""
    from PIL import Image

    img = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def screenshots(url: str, out: Path) -> None:
    """Overview, a cluster page and an image page at 1280x800 in headless chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    out.mkdir(parents=True, exist_ok=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars"):
        opts.add_argument(arg)
    d = webdriver.Chrome(
        service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts
    )
    try:
        d.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
        )
        clusters = sorted(httpx.get(url + "/state.json").json()["clusters"], key=lambda c: -c["size"])
        split = next((c for c in clusters if c["origin"] != "head"), clusters[0])
        pages = {"overview": "/", "cluster": f"/cluster/{split['id']}?order=least", "next": "/next?n=24"}
        for name, path in pages.items():
            d.get(url + path)
            time.sleep(1.0)
            _save(d, out / f"review-{name}.png")
        d.get(url + f"/cluster/{split['id']}?order=least")
        d.get(d.find_element("css selector", "figure.tile a").get_attribute("href"))
        time.sleep(1.0)
        _save(d, out / "review-image.png")
    finally:
        d.quit()


def figure(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for res in results:
        pts = res["curve"]
        tag = "+cervix" if "cervix" in res["views"] else ""
        label = f"seed {res['seed']}{tag}: {100 * res['correct']:.1f} % in {res['decisions']}"
        xs, ys = [p["decisions"] for p in pts], [100 * p["correct"] for p in pts]
        ax.step(xs, ys, where="post", label=label)
    k = results[0]["K"]
    ax.axhline(90, color="gray", ls="--", lw=1)
    ax.axvline(k + 20, color="gray", ls=":", lw=1)
    ax.text(k + 19.7, 3, "K + 20", color="gray", ha="right")
    ax.set_xlabel("decisions taken in the review app")
    ax.set_ylabel("images labelled with their true view (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, k + 21)
    ax.set_title(f"Simulated review of phantoms, bundled model (K = {k})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.review_naming", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--purity", type=float, default=0.9)
    ap.add_argument("--with-cervix", action="store_true", help="one more run per seed with the unseen view")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/review")
    ap.add_argument("--screenshots", type=Path, default=None)
    ap.add_argument("--figure-only", action="store_true", help="redraw the figure from OUT/naming.json")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.figure_only:
        figure(json.loads((args.out / "naming.json").read_text())["results"], args.out / "naming.png")
        return 0
    results = []
    scenarios = [(s, BUNDLED_VIEWS) for s in args.seeds]
    if args.with_cervix:
        scenarios += [(s, (*BUNDLED_VIEWS, "cervix")) for s in args.seeds]
    for i, (seed, views) in enumerate(scenarios):
        with tempfile.TemporaryDirectory(prefix="fusc-review-naming-") as tmp:
            t0 = time.perf_counter()
            res = run_seed(seed, args.n, views, args.purity, Path(tmp), args.screenshots if i == 0 else None)
            res["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        print(
            f"seed {seed} views {len(views)}: {100 * res['correct']:.1f} % correct "
            f"({100 * res['labelled']:.1f} % labelled) with {res['decisions']} decisions "
            f"(budget {res['budget']}, {res['splits']} splits); naming head clusters alone "
            f"{100 * res['naming_head_clusters_by_majority']:.1f} %",
            flush=True,
        )
    summary = {
        "protocol": __doc__.split("\n\n")[1:3],
        "n_images": args.n,
        "purity_threshold": args.purity,
        "results": results,
    }
    (args.out / "naming.json").write_text(json.dumps(summary, indent=1) + "\n")
    figure(results, args.out / "naming.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
