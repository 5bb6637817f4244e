"""The review web app: server-rendered pages over one archive run, forms that take decisions.

Starlette + Jinja2 (both already in the runtime through BentoML), one small bundled script, nothing
fetched from elsewhere: it runs on a hospital machine with no internet. Pages never show a key or a source
path (either may hold a patient's name): images are known by a hash of their key.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from service.archive.store import load_run
from service.card import CARD_FILENAME, ModelCard, load_card, sha256_file
from service.clean import CleanConfig
from service.errors import FuscError
from service.review import active, exports
from service.review.decisions import DecisionError, DecisionLog
from service.review.images import ImageStore
from service.review.labelstudio import LabelStudio, LabelStudioError, pull, push
from service.review.state import MARKS, Review
from service.taxonomy import VIEWS

HERE = Path(__file__).resolve().parent
PAGE = 60  # images per page of a cluster grid
STRIP = 8  # thumbnails per cluster on the overview
TOKEN_COOKIE = "fusc_review_token"
WHO_COOKIE = "fusc_reviewer"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ReviewConfig:
    run_dir: Path
    state_dir: Path | None = None  # default: <run_dir>/review
    host: str = "127.0.0.1"
    token: str | None = None  # required (or users) when host is not loopback
    users: dict[str, str] = field(default_factory=dict)  # basic auth: user -> password
    default_user: str = "reviewer"
    model_repository: Path | None = None  # where a new card version is written; default: the run's
    labelstudio_url: str | None = None
    labelstudio_token: str | None = None
    labelstudio_root: Path | None = None  # Label Studio's LOCAL_FILES_DOCUMENT_ROOT

    def check_access(self) -> None:
        if not is_loopback(self.host) and not (self.token or self.users):
            raise ValueError(
                f"the review app would listen on {self.host}, beyond this machine, with no access control: "
                "give a token (--token, FUSC_REVIEW_TOKEN) or users for basic auth (--users-file)"
            )
        if self.token is not None and len(self.token) < 16:
            raise ValueError("the access token must be at least 16 characters long")


class AccessMiddleware(BaseHTTPMiddleware):
    """Token (bearer header or the cookie set by /login) or basic auth, when configured; who is who."""

    def __init__(self, app, config: ReviewConfig) -> None:
        super().__init__(app)
        self.config = config

    def _basic_user(self, request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("basic "):
            return None
        try:
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        expected = self.config.users.get(user)
        if expected is not None and hmac.compare_digest(expected.encode(), password.encode()):
            return user
        return None

    def _token_ok(self, request: Request) -> bool:
        token = self.config.token
        if not token:
            return False
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.cookies.get(TOKEN_COOKIE, "")
        return bool(given) and hmac.compare_digest(given.encode(), token.encode())

    async def dispatch(self, request: Request, call_next):
        cfg = self.config
        user: str | None = None
        if cfg.users:
            user = self._basic_user(request)
        allowed = (not cfg.token and not cfg.users) or user is not None or self._token_ok(request)
        if not allowed:
            if request.url.path in ("/login", "/static/review.css"):
                return await call_next(request)
            if cfg.users and not cfg.token:
                return PlainTextResponse(
                    "sign in", status_code=401, headers={"WWW-Authenticate": 'Basic realm="fusc review"'}
                )
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                return RedirectResponse("/login", status_code=303)
            return PlainTextResponse("an access token is required", status_code=401)
        name = user or request.cookies.get(WHO_COOKIE) or cfg.default_user
        request.state.who = "".join(ch for ch in name if ch.isprintable())[:64] or cfg.default_user
        response = await call_next(request)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'"
        )
        return response


def _run_card(run_dir_manifest, repository: Path | None) -> ModelCard | None:
    """The model card the run was clustered with (current or kept under cards/), else the current one."""
    if repository is None or not (repository / CARD_FILENAME).is_file():
        return None
    candidates = [
        repository / CARD_FILENAME,
        *sorted((repository / exports.HISTORY).glob("model_card.*.json")),
    ]
    for path in candidates:
        try:
            if sha256_file(path) == run_dir_manifest.card_sha256:
                return ModelCard.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    try:
        return load_card(repository, verify=False)
    except FuscError:
        return None


def _map_svg(review: Review, highlight: int | None, size: int = 340) -> str:
    """The run's 2-D map as an inline SVG: every image a gray dot, those of ``highlight`` coloured."""
    xy = review.map_xy
    ok = np.isfinite(xy).all(axis=1) & review.ok
    if not ok.any():
        return ""
    pts = xy[ok]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = np.maximum(hi - lo, 1e-9)
    pad = 8
    scaled = pad + (xy - lo) / span * (size - 2 * pad)
    rows = np.flatnonzero(ok)
    inside = rows[review.rc[rows] == highlight] if highlight is not None else rows[:0]
    others = rows[review.rc[rows] != highlight] if highlight is not None else rows
    rng = np.random.default_rng(0)
    if len(others) > 4000:
        others = rng.choice(others, 4000, replace=False)
    if len(inside) > 2000:
        inside = rng.choice(inside, 2000, replace=False)
    parts = [
        f'<svg class="map" viewBox="0 0 {size} {size}" width="{size}" height="{size}" role="img" '
        f'aria-label="2-D map of the run">',
        f'<rect width="{size}" height="{size}" class="map-bg"/>',
    ]
    parts += [
        f'<circle cx="{scaled[r, 0]:.1f}" cy="{size - scaled[r, 1]:.1f}" r="1.6" class="dot"/>'
        for r in others
    ]
    parts += [
        f'<circle cx="{scaled[r, 0]:.1f}" cy="{size - scaled[r, 1]:.1f}" r="2.6" class="dot-in"/>'
        for r in inside
    ]
    parts.append("</svg>")
    return "".join(parts)


class ReviewApp:
    """Everything one review needs: the run, the decision log, the pictures, the templates."""

    def __init__(self, config: ReviewConfig) -> None:
        config.check_access()
        self.config = config
        self.run = load_run(config.run_dir)
        state = Path(config.state_dir or Path(config.run_dir) / "review")
        state.mkdir(parents=True, exist_ok=True)
        self.state_dir = state
        self.log = DecisionLog(state / "decisions.sqlite")
        if self.log.get_meta("run_card_sha256") not in (None, self.run.manifest.card_sha256):
            raise ValueError(
                f"the review state in {state} belongs to a run of another model: give another --state folder"
            )
        self.log.set_meta("run_card_sha256", self.run.manifest.card_sha256)
        self.csrf = self.log.get_meta("csrf") or secrets.token_urlsafe(24)
        self.log.set_meta("csrf", self.csrf)
        repo = config.model_repository or (
            Path(self.run.manifest.model_repository) if self.run.manifest.model_repository else None
        )
        self.repository = repo
        card = _run_card(self.run.manifest, repo)
        self.card = card
        self.review = Review(self.run, self.log, card.cluster_names if card else None)
        self.images = ImageStore(self.run, card.preprocess if card else CleanConfig(), state / "pictures")
        self._index = None
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
        )
        self.env.globals.update(views=list(VIEWS.values()), csrf=self.csrf, marks=MARKS, quote=quote)

    # ------------------------------------------------------------------------------------- helpers
    def render(self, request: Request, template: str, **ctx: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(
            who=request.state.who,
            msg=request.query_params.get("msg"),
            err=request.query_params.get("err"),
            path=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            run=self.run.manifest,
            decisions=len(self.review.decisions),
            **ctx,
        )
        return HTMLResponse(html)

    def neighbours(self, row: int, k: int = 8) -> list[int]:
        import faiss

        if self._index is None:
            ok = np.flatnonzero(self.review.ok)
            index = faiss.IndexFlatIP(self.run.embeddings.shape[1])
            index.add(self.review.unit_embeddings(ok))
            self._index = (index, ok)
        index, ok = self._index
        if not self.review.ok[row]:
            return []
        _, found = index.search(self.review.unit_embeddings(np.asarray([row])), k + 1)
        return [int(ok[i]) for i in found[0] if i >= 0 and int(ok[i]) != row][:k]

    def tile(self, row: int) -> dict:
        r = self.review
        lab = r.label_of(row)
        return {
            "id": r.ids[row],
            "confidence": float(r.confidence[row]),
            "cluster": int(r.rc[row]),
            "ood": bool(r.ood[row]),
            "view": lab.view,
            "status": lab.status,
            "source": lab.source,
        }

    def labelstudio(self) -> LabelStudio | None:
        c = self.config
        if not (c.labelstudio_url and c.labelstudio_token and c.labelstudio_root):
            return None
        return LabelStudio(c.labelstudio_url, c.labelstudio_token)

    def projects(self) -> list[dict]:
        return json.loads(self.log.get_meta("labelstudio_projects") or "[]")

    # --------------------------------------------------------------------------------------- pages
    def overview(self, request: Request) -> Response:
        r = self.review
        clusters = []
        for s in r.clusters():
            strip = [r.ids[i] for i in r.members(s.id)[:STRIP]]
            clusters.append({"s": s, "strip": strip})
        labels = r.labels()
        labelled = sum(1 for lab in labels if lab.view)
        return self.render(
            request,
            "overview.html",
            clusters=clusters,
            total=len(r.keys),
            answered=int(r.ok.sum()),
            errors=dict(r.error_codes),
            labelled=labelled,
            accepted=len(r.accepted),
        )

    def cluster(self, request: Request) -> Response:
        r = self.review
        try:
            c = int(request.path_params["cid"])
        except ValueError:
            return PlainTextResponse("no such cluster", status_code=404)
        s = r.cluster(c)
        if s is None:
            return PlainTextResponse("no such cluster (merged away or undone?)", status_code=404)
        order = "least" if request.query_params.get("order") == "least" else "confident"
        page = max(0, int(request.query_params.get("page", "0") or 0))
        rows = r.members(c, order)
        pages = max(1, -(-len(rows) // PAGE))
        page = min(page, pages - 1)
        tiles = [self.tile(i) for i in rows[page * PAGE : (page + 1) * PAGE]]
        others = [o for o in r.clusters() if o.id != c]
        return self.render(
            request,
            "cluster.html",
            s=s,
            tiles=tiles,
            order=order,
            page=page,
            pages=pages,
            others=others,
            map_svg=_map_svg(r, c),
        )

    def image(self, request: Request) -> Response:
        r = self.review
        row = r.row_of_id.get(request.path_params["iid"])
        if row is None:
            return PlainTextResponse("no such image", status_code=404)
        top = []
        for cl, p in zip(r.top_clusters[row], r.top_probs[row], strict=False):
            top.append({"cluster": cl, "p": p, "name": r.names.get(cl) or r.card_names.get(cl)})
        ood_score = r.run.table.column("ood_score")[row].as_py()
        return self.render(
            request,
            "image.html",
            t=self.tile(row),
            head=int(r.head[row]),
            cluster_name=r.names.get(int(r.rc[row])),
            subject=r.subjects[row],
            ood_score=ood_score,
            top=top,
            neighbours=[self.tile(i) for i in self.neighbours(row)],
            error=r.run.table.column("error_code")[row].as_py(),
        )

    def picture(self, request: Request) -> Response:
        iid, kind = request.path_params["iid"], request.path_params["kind"]
        row = self.review.row_of_id.get(iid)
        if row is None or kind not in ("thumb", "clean", "original"):
            return PlainTextResponse("no such picture", status_code=404)
        data = self.images.get(row, iid, kind)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    def _pick(self, request: Request) -> tuple[list[tuple[int, str]], int, str]:
        n = min(500, max(1, int(request.query_params.get("n", "24") or 24)))
        strategy = request.query_params.get("strategy", "mixed")
        if strategy not in active.STRATEGIES:
            strategy = "mixed"
        return active.pick(self.review, n, strategy), n, strategy

    def next_page(self, request: Request) -> Response:
        picked, n, strategy = self._pick(request)
        tiles = [{**self.tile(row), "why": why} for row, why in picked]
        return self.render(
            request,
            "next.html",
            tiles=tiles,
            n=n,
            strategy=strategy,
            strategies=active.STRATEGIES,
            labelstudio=self.labelstudio() is not None,
        )

    def next_csv(self, request: Request) -> Response:
        picked, _, _ = self._pick(request)
        r = self.review
        lines = ["key,image_id,cluster,confidence,criterion"]
        for row, why in picked:
            key = r.keys[row].replace('"', '""')
            lines.append(f'"{key}",{r.ids[row]},{int(r.rc[row])},{r.confidence[row]:.4f},{why}')
        return Response(
            "\n".join(lines) + "\n",
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="label-next.csv"'},
        )

    def decisions_page(self, request: Request) -> Response:
        r = self.review
        items = [{"d": d, "text": r.describe(d)} for d in reversed(self.log.all())]
        return self.render(request, "decisions.html", items=items)

    def export_page(self, request: Request) -> Response:
        current = None
        if self.repository is not None:
            try:
                current = load_card(self.repository, verify=False)
            except FuscError:
                current = None
        kept = []
        if self.repository is not None and (self.repository / exports.HISTORY).is_dir():
            kept = sorted(p.name for p in (self.repository / exports.HISTORY).glob("model_card.*.json"))
        return self.render(
            request,
            "export.html",
            names=self.review.card_names_now(),
            current=current,
            kept=kept,
            repository=self.repository,
            labelstudio=self.labelstudio() is not None,
            labelstudio_url=self.config.labelstudio_url,
            projects=self.projects(),
        )

    def labels_csv(self, request: Request) -> Response:
        return Response(
            exports.labels_csv(self.review),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="labels.csv"'},
        )

    def labels_parquet(self, request: Request) -> Response:
        return Response(
            exports.labels_parquet(self.review),
            media_type="application/vnd.apache.parquet",
            headers={"Content-Disposition": 'attachment; filename="labels.parquet"'},
        )

    def state_json(self, request: Request) -> Response:
        """The review's state for scripts: clusters and the decision count (no keys)."""
        r = self.review
        body = {
            "run_model_version": r.run.manifest.model_version,
            "decisions": len(r.decisions),
            "clusters": [
                {
                    "id": s.id,
                    "size": s.size,
                    "name": s.name,
                    "accepted": s.accepted,
                    "mean_confidence": round(s.mean_confidence, 4),
                    "ood_share": round(s.ood_share, 4),
                    "origin": s.origin,
                    "merged": list(s.merged),
                }
                for s in r.clusters()
            ],
        }
        return Response(json.dumps(body), media_type="application/json")

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            request.state.who = ""
            html = self.env.get_template("login.html").render(err=request.query_params.get("err"))
            return HTMLResponse(html)
        form = await request.form()
        token = str(form.get("token", ""))
        if not self.config.token or not hmac.compare_digest(token.encode(), self.config.token.encode()):
            return RedirectResponse("/login?err=" + quote("that token is not right"), status_code=303)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(
            TOKEN_COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
        return resp

    # ------------------------------------------------------------------------------------- actions
    async def action(self, request: Request) -> Response:
        form = await request.form()
        back = str(form.get("next", "/"))
        if not back.startswith("/") or back.startswith("//"):
            back = "/"
        if not hmac.compare_digest(str(form.get("csrf", "")).encode(), self.csrf.encode()):
            return PlainTextResponse("the form is stale: reload the page", status_code=403)
        what = request.path_params["what"]
        who = request.state.who
        r = self.review
        r.sync()
        try:
            msg = await run_in_threadpool(self._act, what, form, who, r)
        except (DecisionError, ValueError, KeyError, FuscError, LabelStudioError) as exc:
            text = exc.message if isinstance(exc, FuscError) else str(exc)
            return RedirectResponse(_with(back, err=text), status_code=303)
        resp = RedirectResponse(_with(back, msg=msg), status_code=303)
        if what == "who":
            resp.set_cookie(WHO_COOKIE, str(form.get("who", ""))[:64], httponly=True, samesite="strict")
        return resp

    def _rows(self, form) -> list[int]:
        ids = form.getlist("img")
        rows = [self.review.row_of_id[i] for i in ids if i in self.review.row_of_id]
        if not rows:
            raise DecisionError("no image was chosen: tick one or more images first")
        return rows

    def _act(self, what: str, form, who: str, r: Review) -> str:
        if what == "name":
            d = r.name(int(form["cluster"]), str(form["view"]), who)
            return f"decision {d.id}: named cluster {form['cluster']} {form['view']}"
        if what == "accept":
            view = str(form.get("view", "") or "") or None
            d = r.accept(int(form["cluster"]), who, view)
            return f"decision {d.id}: accepted cluster {form['cluster']}"
        if what == "unaccept":
            d = r.unaccept(int(form["cluster"]), who)
            return f"decision {d.id}: cluster {form['cluster']} is no longer accepted"
        if what == "merge":
            d = r.merge(int(form["source"]), int(form["target"]), who)
            return f"decision {d.id}: merged cluster {form['source']} into {form['target']}"
        if what == "split":
            d = r.split(int(form["cluster"]), who)
            return (
                f"decision {d.id}: {len(d.payload['keys'])} images split off into cluster {d.payload['new']}"
            )
        if what == "mark":
            d = r.mark(self._rows(form), str(form["mark"]), who)
            return f"decision {d.id}: {form['mark']} for {len(d.payload['keys'])} image(s)"
        if what == "label":
            d = r.label(self._rows(form), str(form["view"]), who)
            return f"decision {d.id}: {len(d.payload['keys'])} image(s) labelled {form['view']}"
        if what == "undo":
            raw = str(form.get("decision", "") or "")
            d = r.undo(int(raw) if raw else None, who)
            return f"decision {d.payload['decision']} undone"
        if what == "who":
            return "reviewer name saved"
        if what == "publish":
            if self.repository is None:
                raise DecisionError("no model repository is known: start the app with --model-repository")
            out = exports.publish_card(r, self.repository, who)
            return f"model card {out['version']} written (the old {out['previous_version']} is kept)"
        if what in ("labelstudio-push", "labelstudio-pull"):
            ls = self.labelstudio()
            if ls is None:
                raise DecisionError("Label Studio is not configured: start the app with --labelstudio-url")
            if what == "labelstudio-push":
                scope = str(form.get("scope", "all"))
                if scope == "next":
                    n = min(500, max(1, int(form.get("n", "24") or 24)))
                    rows = [row for row, _ in active.pick(r, n, str(form.get("strategy", "mixed")))]
                else:
                    rows = np.flatnonzero(r.ok).tolist()
                stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
                title = f"fusc review {r.run.manifest.model_version} {scope} {stamp}"
                out = push(r, self.images, ls, rows, root=Path(self.config.labelstudio_root), title=title)
                projects = self.projects() + [{"id": out["project"], "title": title, "tasks": out["tasks"]}]
                self.log.set_meta("labelstudio_projects", json.dumps(projects))
                return (
                    f"Label Studio project {out['project']}: {out['tasks']} tasks, "
                    f"{out['with_predictions']} pre-annotated"
                )
            project = int(form["project"])
            labels, annotators = pull(ls, project)
            if not labels:
                return f"Label Studio project {project} has no finished annotations yet"
            d = r.import_labels(labels, "labelstudio", who, {"project": project, "annotators": annotators})
            return f"decision {d.id}: {len(labels)} labels read back from Label Studio project {project}"
        raise DecisionError(f"unknown action {what!r}")


def _with(url: str, **params: str) -> str:
    base, _, query = url.partition("?")
    kept = [p for p in query.split("&") if p and not p.startswith(("msg=", "err="))]
    kept.append(urlencode(params))
    return base + "?" + "&".join(kept)


def create_app(config: ReviewConfig) -> Starlette:
    ra = ReviewApp(config)

    def page(fn):
        # Plain functions: Starlette runs them in its thread pool, so a slow picture does not hold up the
        # rest; each first catches up with decisions another app took on the same state folder.
        def endpoint(request: Request) -> Response:
            ra.review.sync()
            return fn(request)

        return endpoint

    routes = [
        Route("/", page(ra.overview)),
        Route("/cluster/{cid}", page(ra.cluster)),
        Route("/image/{iid}", page(ra.image)),
        Route("/img/{kind}/{iid}.png", ra.picture),
        Route("/next", page(ra.next_page)),
        Route("/next.csv", page(ra.next_csv)),
        Route("/decisions", page(ra.decisions_page)),
        Route("/export", page(ra.export_page)),
        Route("/export/labels.csv", page(ra.labels_csv)),
        Route("/export/labels.parquet", page(ra.labels_parquet)),
        Route("/state.json", page(ra.state_json)),
        Route("/login", ra.login, methods=["GET", "POST"]),
        Route("/action/{what}", ra.action, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(AccessMiddleware, config=config)])
    app.state.review = ra
    return app
