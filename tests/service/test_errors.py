"""Every error code the HTTP path can answer is catalogued in service.errors.ERROR_CODES (from which the
OpenAPI document lists them), with the status its exception class carries."""

from __future__ import annotations

import re
from pathlib import Path

import service.api  # noqa: F401  (imports every module of the HTTP path, so every FuscError subclass exists)
from service.errors import ERROR_CODES, FuscError
from service.openapi import BATCH_ITEM_CODES, ROUTE_CODES

SERVICE = Path(__file__).resolve().parents[2] / "service"
# Raised while the service starts, never in an answer: a repository or settings problem makes the server
# unready (503 model_not_loaded) and is written to its log.
STARTUP_ONLY = {"model_repository_invalid", "invalid_settings", "backend_not_supported"}
# Programs of their own, not the HTTP service: their codes end in a job's or a run's record (the PACS
# queue's dead letters, an archive run's error column), never in a service answer.
OWN_PROGRAMS = {"pacs", "archive", "review"}
# ... except the parts of them the HTTP service serves (POST /v1/similar).
SERVED_FROM_PROGRAMS = {"service.archive.similar"}


def answered_over_http(cls: type) -> bool:
    parts = cls.__module__.split(".")
    in_program = len(parts) > 1 and parts[0] == "service" and parts[1] in OWN_PROGRAMS
    return not in_program or cls.__module__ in SERVED_FROM_PROGRAMS


def subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *subclasses(sub)]
    return out


def test_every_error_class_is_catalogued_with_its_status() -> None:
    for cls in subclasses(FuscError):
        if cls.code in STARTUP_ONLY or not answered_over_http(cls):
            continue
        assert cls.code in ERROR_CODES, f"{cls.__name__}.code = {cls.code!r} is not in ERROR_CODES"
        assert ERROR_CODES[cls.code][0] == cls.http_status, cls.__name__


def test_every_code_given_at_a_raise_is_catalogued() -> None:
    for path in SERVICE.rglob("*.py"):
        if path.relative_to(SERVICE).parts[0] in OWN_PROGRAMS:
            continue
        for code in re.findall(r'\bcode="([a-z_]+)"', path.read_text()):
            assert code in ERROR_CODES, f"{path.relative_to(SERVICE)} raises {code!r}, not in ERROR_CODES"


def test_routes_list_only_catalogued_codes() -> None:
    for codes in (*ROUTE_CODES.values(), BATCH_ITEM_CODES):
        assert set(codes) <= set(ERROR_CODES)
    assert all(400 <= status < 600 and text for status, text in ERROR_CODES.values())
