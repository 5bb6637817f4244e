"""Where an archive run's images come from: a folder tree (images and DICOM files, found by name or magic
bytes), a CSV/Parquet list of paths, or a DICOMweb server (QIDO-RS to list, WADO-RS to fetch).

A source is listed once, when a run is planned: each item gets a ``key`` (unique and stable: the path
relative to the root, or ``sop:<SOP Instance UID>``) and a ``source`` the workers read the bytes from. The
plan is frozen in the run folder, so that a resumed run works through exactly the same items. Subject
identifiers that a list or a QIDO answer gives are hashed here and go no further; DICOM headers are read
by the workers (service.archive.worker), where the bytes are read anyway.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from service.archive.errors import SourceError, SourceReadError
from service.archive.subjects import SubjectHasher
from service.errors import ImageTooLargeError

# File names read as images in a folder tree. DICOM files often have no suffix at all, or a numeric one
# (files named after their UID, "1.2.840.113619.2.55.3"): those are read too, and sniffed by the decoder.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".dic"})
# Folders never descended into (a run folder written inside the tree it reads, version control, caches).
SKIP_DIRS = frozenset({".git", "__pycache__", ".ipynb_checkpoints"})
LIST_PATH_COLUMNS = ("path", "file", "filename", "filepath")
LIST_SUBJECT_COLUMNS = ("subject", "patient_id", "patient")

SourceKind = Literal["folder", "list", "dicomweb"]

# What every plan row holds (the item's answer is added by the worker).
PLAN_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("sop_instance_uid", pa.string()),
        pa.field("subject_key", pa.string()),
    ]
)


@dataclass(frozen=True)
class SourceSpec:
    """A picklable description of a source, enough for any worker (process, Ray actor) to read items."""

    kind: SourceKind
    root: str  # folder root, the list file's folder, or the DICOMweb base URL without credentials
    described: str  # how the user gave it, for the manifest (never with credentials)
    auth: tuple[str, str] | None = field(default=None, repr=False)
    qido: tuple[tuple[str, str], ...] = ()  # QIDO-RS study filters
    timeout_s: float = 60.0


@dataclass
class Listing:
    table: pa.Table  # PLAN_SCHEMA, sorted by key, keys unique
    left_out: dict[str, int] = field(default_factory=dict)  # why -> count (suffixes, duplicates)


def _strip_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    parts = urlsplit(url)
    auth = None
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        auth = (user, password)
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")), auth


def resolve(source: str, *, qido: str = "", auth: str | None = None) -> SourceSpec:
    """A source from the command line: a URL (DICOMweb), a .csv/.parquet list, or a folder."""
    if source.startswith(("http://", "https://", "dicomweb:", "dicomweb+")):
        url = re.sub(r"^dicomweb\+?:?(//)?", "", source) if source.startswith("dicomweb") else source
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        base, url_auth = _strip_credentials(url)
        filters = tuple(parse_qsl(urlsplit(url).query)) + tuple(parse_qsl(qido))
        user_auth = tuple(auth.split(":", 1)) if auth else None
        if user_auth is not None and len(user_auth) != 2:
            raise SourceError("DICOMweb credentials must be given as USER:PASSWORD")
        return SourceSpec(
            kind="dicomweb",
            root=base,
            described=base + ("?" + "&".join(f"{k}={v}" for k, v in filters) if filters else ""),
            auth=user_auth or url_auth,  # type: ignore[arg-type]
            qido=filters,
        )
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in (".csv", ".parquet", ".pq", ".tsv"):
        return SourceSpec(kind="list", root=str(path.resolve().parent), described=str(path.resolve()))
    if path.is_dir():
        return SourceSpec(kind="folder", root=str(path.resolve()), described=str(path.resolve()))
    raise SourceError(f"the source {source} is neither a folder, a .csv/.parquet list nor a DICOMweb URL")


# --------------------------------------------------------------------------------------------- listing
def _walk(root: Path, skip: Path | None) -> Iterator[Path]:
    """Every regular file under ``root`` (symbolic links to files included), without following links to
    folders (no loops), depth first with ``os.scandir`` (much faster than ``Path.rglob`` on big trees)."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in SKIP_DIRS and (skip is None or Path(entry.path) != skip):
                        stack.append(Path(entry.path))
                elif entry.is_file():
                    yield Path(entry.path)
            except OSError:
                continue


def wanted_file(name: str) -> bool:
    suffix = os.path.splitext(name)[1].lower()
    return suffix in IMAGE_SUFFIXES or suffix == "" or suffix[1:].isdigit()


def list_folder(spec: SourceSpec, *, all_files: bool = False, skip: Path | None = None) -> Listing:
    root = Path(spec.root)
    keys: list[str] = []
    left_out: Counter[str] = Counter()
    for path in _walk(root, skip.resolve() if skip else None):
        rel = path.relative_to(root).as_posix()
        if all_files or wanted_file(path.name):
            keys.append(rel)
        else:
            left_out[f"suffix {path.suffix.lower()}"] += 1
    keys.sort()
    n = len(keys)
    table = pa.table(
        {"key": keys, "source": keys, "sop_instance_uid": [None] * n, "subject_key": [None] * n},
        schema=PLAN_SCHEMA,
    )
    return Listing(table, dict(left_out))


def _pick(names: list[str], wanted: tuple[str, ...]) -> str | None:
    lower = {n.lower(): n for n in names}
    return next((lower[w] for w in wanted if w in lower), None)


def list_paths(spec: SourceSpec, hasher: SubjectHasher) -> Listing:
    """A CSV (comma or tab separated) or Parquet list: a ``path`` column (or file/filename/filepath),
    relative paths taken from the list's own folder; an optional ``subject`` (or patient_id) column is
    hashed into the subject key; an optional ``key`` column replaces the path as the item's key."""
    path = Path(spec.described)
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pq.read_table(path)
        else:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            table = pacsv.read_csv(
                path,
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
            )
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"the list {path.name} could not be read: {exc}") from exc
    column = _pick(table.column_names, LIST_PATH_COLUMNS)
    if column is None:
        raise SourceError(f"the list {path.name} has no path column (one of {', '.join(LIST_PATH_COLUMNS)})")
    paths = [str(p) for p in table.column(column).to_pylist()]
    subject_col = _pick(table.column_names, LIST_SUBJECT_COLUMNS)
    subjects = table.column(subject_col).to_pylist() if subject_col else [None] * len(paths)
    key_col = _pick(table.column_names, ("key",))
    keys = [str(k) for k in table.column(key_col).to_pylist()] if key_col else paths
    seen: dict[str, tuple[str, str | None]] = {}
    left_out: Counter[str] = Counter()
    for key, p, subject in zip(keys, paths, subjects, strict=True):
        if not p or p == "None":
            left_out["empty path"] += 1
            continue
        if key in seen:
            left_out["listed twice"] += 1
            continue
        hashed = hasher.hash(f"subject={subject}") if subject not in (None, "") else None
        seen[key] = (p, hashed)
    ordered = sorted(seen)
    table = pa.table(
        {
            "key": ordered,
            "source": [seen[k][0] for k in ordered],
            "sop_instance_uid": [None] * len(ordered),
            "subject_key": [seen[k][1] for k in ordered],
        },
        schema=PLAN_SCHEMA,
    )
    return Listing(table, dict(left_out))


# -------------------------------------------------------------------------------------------- DICOMweb
_STUDY_UID, _SERIES_UID, _SOP_UID, _PATIENT_ID = "0020000D", "0020000E", "00080018", "00100020"


def _value(item: dict, tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def dicomweb_client(spec: SourceSpec) -> httpx.Client:
    return httpx.Client(base_url=spec.root + "/", auth=spec.auth, timeout=spec.timeout_s)


def _qido(client: httpx.Client, path: str, params: list[tuple[str, str]], page: int = 500) -> Iterator[dict]:
    """Every answer of a QIDO-RS query, page by page (limit/offset), for servers that cap answers."""
    offset = 0
    while True:
        try:
            response = client.get(
                path,
                params=[*params, ("limit", str(page)), ("offset", str(offset))],
                headers={"Accept": "application/dicom+json"},
            )
        except httpx.HTTPError as exc:
            raise SourceError(f"the DICOMweb server did not answer {path}: {type(exc).__name__}") from exc
        if response.status_code == 204:
            return
        if response.status_code != 200:
            raise SourceError(f"the DICOMweb server answered {response.status_code} to {path}")
        items = response.json() or []
        yield from items
        if len(items) < page:
            return
        offset += len(items)


def list_dicomweb(spec: SourceSpec, hasher: SubjectHasher) -> Listing:
    """Studies matching the QIDO filters, then each study's instances; key ``sop:<SOP Instance UID>``."""
    rows: dict[str, tuple[str, str, str | None]] = {}
    left_out: Counter[str] = Counter()
    with dicomweb_client(spec) as client:
        studies = [
            s for s in (_value(item, _STUDY_UID) for item in _qido(client, "studies", list(spec.qido))) if s
        ]
        for study in sorted(set(studies)):
            for item in _qido(client, f"studies/{study}/instances", [("includefield", _PATIENT_ID)]):
                series, sop = _value(item, _SERIES_UID), _value(item, _SOP_UID)
                if not series or not sop:
                    left_out["no UIDs in the QIDO answer"] += 1
                    continue
                key = f"sop:{sop}"
                if key in rows:
                    left_out["listed twice"] += 1
                    continue
                patient = _value(item, _PATIENT_ID)
                subject = hasher.hash(f"PatientID={patient}") if patient else None
                # A full URL (never with credentials): readers that only read local files can tell.
                rows[key] = (f"{spec.root}/studies/{study}/series/{series}/instances/{sop}", sop, subject)
    ordered = sorted(rows)
    table = pa.table(
        {
            "key": ordered,
            "source": [rows[k][0] for k in ordered],
            "sop_instance_uid": [rows[k][1] for k in ordered],
            "subject_key": [rows[k][2] for k in ordered],
        },
        schema=PLAN_SCHEMA,
    )
    return Listing(table, dict(left_out))


def list_source(
    spec: SourceSpec, hasher: SubjectHasher, *, all_files: bool = False, skip: Path | None = None
) -> Listing:
    if spec.kind == "folder":
        return list_folder(spec, all_files=all_files, skip=skip)
    if spec.kind == "list":
        return list_paths(spec, hasher)
    return list_dicomweb(spec, hasher)


# --------------------------------------------------------------------------------------------- reading
def _multipart_first(body: bytes, content_type: str) -> bytes:
    """The first part of a multipart/related answer (WADO-RS wraps each instance in one)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        return body  # a server that answered the bare object
    boundary = b"--" + match.group(1).encode()
    start = body.find(boundary)
    if start < 0:
        raise SourceReadError("the DICOMweb answer is not the multipart body it announced")
    head_end = body.find(b"\r\n\r\n", start)
    end = body.find(b"\r\n" + boundary, head_end + 4)
    if head_end < 0 or end < 0:
        raise SourceReadError("the DICOMweb answer ends inside its first part")
    return body[head_end + 4 : end]


class Reader:
    """Reads one item's bytes; one per worker (it holds the DICOMweb connection)."""

    def __init__(self, spec: SourceSpec, max_bytes: int) -> None:
        self.spec = spec
        self.max_bytes = max_bytes
        self.root = Path(spec.root)
        self._client: httpx.Client | None = None

    def read(self, source: str) -> bytes:
        if self.spec.kind == "dicomweb":
            return self._fetch(source)
        path = Path(source)
        path = path if path.is_absolute() else self.root / path
        try:
            size = path.stat().st_size
            if size > self.max_bytes:
                # Not read: Pipeline.prepare would refuse it with the same code, after the memory is spent.
                raise ImageTooLargeError(f"the file is larger than the limit of {self.max_bytes} bytes")
            return path.read_bytes()
        except OSError as exc:
            # The error names the kind of failure, never the path (paths can carry patient names).
            raise SourceReadError(f"the file could not be read ({type(exc).__name__})") from exc

    def _fetch(self, source: str) -> bytes:
        if self._client is None:
            self._client = dicomweb_client(self.spec)
        headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        try:
            response = self._client.get(source, headers=headers)
            if response.status_code == 406:  # a server that will not send the stored syntax as it is
                response = self._client.get(
                    source, headers={"Accept": 'multipart/related; type="application/dicom"'}
                )
        except httpx.HTTPError as exc:
            raise SourceReadError(f"the DICOMweb fetch failed ({type(exc).__name__})") from exc
        if response.status_code != 200:
            raise SourceReadError(f"the DICOMweb server answered {response.status_code}")
        return _multipart_first(response.content, response.headers.get("content-type", ""))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
