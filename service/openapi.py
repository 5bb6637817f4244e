"""The API's own description: the OpenAPI 3.1 document served at ``/docs.json`` and a plain docs page.

BentoML generates neither for routes mounted with ``@bentoml.asgi_app`` (its document lists the health
routes only) and its docs page loads scripts from third parties, which a hospital network will not allow.
Here the document is built from the response models and :data:`service.errors.ERROR_CODES`, and the page
is HTML and inline CSS rendered on the server: no script, no font, nothing fetched from anywhere.
"""

from __future__ import annotations

import html
from typing import Any

from pydantic.json_schema import models_json_schema

from service.archive.similar import MAX_K, SimilarResponse
from service.errors import ERROR_CODES
from service.pipeline import BatchResponse, ClusterResult, EmbedResult, ErrorResponse
from service.settings import Settings

# Per route, the codes its answer's status can carry. In a batch answer, an image's own error (a corrupt
# file, say) is an entry of `results`, not the status of the whole answer.
_IMAGE_CODES = (
    "empty_input",
    "corrupt_image",
    "truncated_image",
    "unsupported_format",
    "image_too_small",
    "dicom_no_pixel_data",
    "dicom_not_an_image",
    "preprocess_failed",
    "image_too_large",
)
_REQUEST_CODES = (
    "bad_request",
    "missing_field",
    "malformed_multipart",
    "too_many_files",
    "unsupported_media_type",
    "image_too_large",
    "method_not_allowed",
)
_SERVER_CODES = ("internal_error", "model_failed", "backend_unavailable", "overloaded", "model_not_loaded")
_AUTH_CODES = ("unauthorized",)

ROUTE_CODES: dict[str, tuple[str, ...]] = {
    "/v1/cluster": _IMAGE_CODES + _REQUEST_CODES + _SERVER_CODES + _AUTH_CODES,
    "/v1/embed": _IMAGE_CODES + _REQUEST_CODES + _SERVER_CODES + _AUTH_CODES,
    "/v1/cluster/batch": _REQUEST_CODES + _SERVER_CODES + _AUTH_CODES,
    "/v1/model": ("method_not_allowed", "internal_error", "model_not_loaded") + _AUTH_CODES,
    "/v1/similar": _IMAGE_CODES
    + _REQUEST_CODES
    + ("no_similar_index", "index_model_mismatch")
    + _SERVER_CODES
    + _AUTH_CODES,
}
# Codes an entry of a batch answer's `results` can carry.
BATCH_ITEM_CODES = _IMAGE_CODES

_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    405: {"Allow": {"description": "the methods the route accepts", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}},
}


def _schemas() -> dict[str, Any]:
    _, top = models_json_schema(
        [
            (m, "serialization")
            for m in (ClusterResult, BatchResponse, EmbedResult, ErrorResponse, SimilarResponse)
        ],
        ref_template="#/components/schemas/{model}",
    )
    return top["$defs"]


def _error_responses(codes: tuple[str, ...]) -> dict[str, Any]:
    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys(codes):
        by_status.setdefault(ERROR_CODES[code][0], []).append(code)
    responses: dict[str, Any] = {}
    for status in sorted(by_status):
        listed = by_status[status]
        responses[str(status)] = {
            "description": "; ".join(f"`{c}`: {ERROR_CODES[c][1]}" for c in listed),
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/ErrorResponse"},
                    "examples": {
                        c: {"value": {"error": {"code": c, "message": ERROR_CODES[c][1]}}} for c in listed
                    },
                }
            },
            **({"headers": _HEADERS[status]} if status in _HEADERS else {}),
        }
    return responses


def _multipart(field: str, many: bool, limit: int = 1) -> dict[str, Any]:
    binary = {"type": "string", "format": "binary"}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [field],
                    "properties": {
                        field: {"type": "array", "items": binary, "maxItems": limit} if many else binary
                    },
                },
                "encoding": {
                    field: {"contentType": "image/png, image/jpeg, image/bmp, image/tiff, application/dicom"}
                },
            }
        },
    }


def _ok(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def build_openapi(settings: Settings, version: str = "unknown") -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route (/v1 and the health routes), for these settings."""
    secured = [{"bearer": []}, {"apiKey": []}] if settings.api_keys else []
    max_files = settings.max_batch_files

    def op(summary: str, description: str, route: str, ok: dict[str, Any], body=None) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "summary": summary,
            "description": description,
            "responses": {"200": ok, **_error_responses(ROUTE_CODES[route])},
        }
        if body is not None:
            operation["requestBody"] = body
        if secured:
            operation["security"] = secured
        else:
            operation["responses"].pop("401", None)
        return operation

    def plain(summary: str, description: str, status_503: str | None = None) -> dict[str, Any]:
        responses: dict[str, Any] = {"200": {"description": "yes", "content": {"text/plain": {}}}}
        if status_503:
            responses["503"] = {
                "description": status_503,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                "headers": _HEADERS[503],
            }
        return {"get": {"summary": summary, "description": description, "responses": responses}}

    limits = (
        f"At most {settings.max_upload_bytes} bytes per file, {settings.max_pixels} decoded pixels per image."
    )
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "fusc: fetal ultrasound semantic clustering",
            "version": version,
            "description": (
                "Sorts fetal ultrasound images into anatomical views without labels. Every error is "
                '`{"error": {"code", "message"}}` with a stable code; 4xx is the caller\'s, 503 carries '
                "Retry-After and is safe to retry. No answer, log line or metric carries a file name or "
                "patient identifier, except that /v1/similar names archive images by their archive run key."
            ),
        },
        "paths": {
            "/v1/cluster": {
                "post": op(
                    "Cluster one image",
                    f"The image's cluster, probabilities, confidence, view name and OOD flag. {limits}",
                    "/v1/cluster",
                    _ok("ClusterResult", "the image's answer"),
                    _multipart("image", False),
                )
            },
            "/v1/cluster/batch": {
                "post": op(
                    "Cluster several images",
                    f"Up to {max_files} files in the repeated field `images`; one answer per file, in "
                    "order: a ClusterResult, or that file's own error ("
                    + ", ".join(f"`{c}`" for c in BATCH_ITEM_CODES)
                    + f"). {limits}",
                    "/v1/cluster/batch",
                    _ok("BatchResponse", "one entry per file, in order"),
                    _multipart("images", True, max_files),
                )
            },
            "/v1/embed": {
                "post": op(
                    "Embed one image",
                    f"The backbone's embedding of the cleaned image, L2-normalised. {limits}",
                    "/v1/embed",
                    _ok("EmbedResult", "the image's embedding"),
                    _multipart("image", False),
                )
            },
            "/v1/model": {
                "get": op(
                    "The model card",
                    "Version, K, cluster names, preprocessing, provenance, measured quality, the backend, "
                    "the limits and the current cluster-mix drift.",
                    "/v1/model",
                    {"description": "the model card and serving state", "content": {"application/json": {}}},
                )
            },
            "/v1/similar": {
                "post": {
                    **op(
                        "Similar archive images",
                        "The `k` archive images (query parameter, 1 to "
                        f"{MAX_K}, default 10) whose embeddings are nearest to this image's, with their "
                        "clusters: from the archive run index the service was started with "
                        "(FUSC_SIMILAR_INDEX), which must come from the served model. "
                        f"{limits}",
                        "/v1/similar",
                        _ok("SimilarResponse", "the nearest archive images, most similar first"),
                        _multipart("image", False),
                    ),
                    "parameters": [
                        {
                            "name": "k",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
                        }
                    ],
                }
            },
            "/livez": plain("Liveness", "The HTTP server runs."),
            "/healthz": plain("Liveness", "The HTTP server runs (alias of /livez)."),
            "/readyz": plain(
                "Readiness",
                "The model repository loaded, verified and ready to answer.",
                "`model_not_loaded`: not ready (the server log says why)",
            ),
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "description": "The fusc_* families and BentoML's own.",
                    "responses": {
                        "200": {"description": "text exposition format", "content": {"text/plain": {}}}
                    },
                }
            },
        },
        "components": {"schemas": _schemas()},
    }
    if secured:
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
    return doc


_CSS = """
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{margin-top:2rem;border-bottom:1px solid #ddd}code{background:#f4f4f4;padding:0 .2em}
.m{font-weight:bold;font-family:monospace;margin-right:.5em}
table{border-collapse:collapse}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}
"""


def docs_page(doc: dict[str, Any]) -> str:
    """The document as a self-contained HTML page (no script, nothing loaded from elsewhere)."""
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(doc['info']['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(doc['info']['title'])}</h1><p>version {e(doc['info']['version'])}</p>",
        f"<p>{e(doc['info']['description'])}</p>",
        "<p>The machine-readable description of this API is "
        "<a href='/docs.json'>/docs.json</a> (OpenAPI 3.1).</p>",
    ]
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            parts.append(f"<h2><span class='m'>{method.upper()}</span><code>{e(path)}</code></h2>")
            parts.append(f"<p><b>{e(operation['summary'])}</b>. {e(operation['description'])}</p>")
            body = operation.get("requestBody")
            if body:
                schema = body["content"]["multipart/form-data"]["schema"]
                for name, prop in schema["properties"].items():
                    kind = "repeated file field" if prop.get("type") == "array" else "file field"
                    parts.append(f"<p>multipart/form-data, {kind} <code>{e(name)}</code></p>")
            if operation.get("security"):
                parts.append(
                    "<p>Needs an API key: <code>Authorization: Bearer KEY</code> or "
                    "<code>X-API-Key: KEY</code>.</p>"
                )
            rows = "".join(
                f"<tr><td>{e(status)}</td><td>{e(resp['description'])}</td></tr>"
                for status, resp in operation["responses"].items()
            )
            parts.append(f"<table><tr><th>status</th><th>meaning</th></tr>{rows}</table>")
    parts.append("</body></html>")
    return "".join(parts)
