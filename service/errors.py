"""Typed errors of the data path. Every failure the caller can cause maps to one stable code and a 4xx.

Messages never carry patient data: no DICOM identifiers, no burnt-in text, no file names sent by the caller.
"""

from __future__ import annotations


class FuscError(Exception):
    """Base error: a stable machine-readable ``code``, an HTTP status and a sentence a person can act on."""

    code: str = "internal_error"
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class DecodeError(FuscError):
    """The bytes are not an image we can read (default: corrupt or truncated)."""

    code = "corrupt_image"
    http_status = 400


class EmptyInputError(DecodeError):
    code = "empty_input"
    http_status = 400


class UnsupportedFormatError(DecodeError):
    code = "unsupported_format"
    http_status = 415


class ImageTooLargeError(DecodeError):
    code = "image_too_large"
    http_status = 413


class ImageTooSmallError(DecodeError):
    code = "image_too_small"
    http_status = 422


class DicomNoPixelsError(DecodeError):
    code = "dicom_no_pixel_data"
    http_status = 422


class DicomNotAnImageError(DecodeError):
    """A DICOM object of a non-image SOP class (structured report, PDF, presentation state, ...)."""

    code = "dicom_not_an_image"
    http_status = 422


class BadRequestError(FuscError):
    """The request itself is malformed (missing field, too many files)."""

    code = "bad_request"
    http_status = 400


class BackendUnavailableError(FuscError):
    """The inference backend cannot answer now; the caller should retry later."""

    code = "backend_unavailable"
    http_status = 503


class ModelRepositoryError(FuscError):
    """The model repository is missing, inconsistent with its card, or tampered with."""

    code = "model_repository_invalid"
    http_status = 500


class ModelFailedError(FuscError):
    """The model itself raised on this input (a shape it cannot take, an operator that fails): the same
    request would fail again, so this is a 500 with its own code, not a 503 that invites a retry."""

    code = "model_failed"
    http_status = 500


class OverloadedError(BackendUnavailableError):
    """Admission control refused the request (too many requests, bytes or images in flight, or a predicted
    wait beyond the latency budget). Nothing of it was processed; retrying after Retry-After is safe."""

    code = "overloaded"


class NotReadyError(BackendUnavailableError):
    """The model repository did not load (the server log says why) or the backend is not ready."""

    code = "model_not_loaded"


class UnauthorizedError(FuscError):
    """An API key is required on /v1 routes and none, or an unknown one, was sent."""

    code = "unauthorized"
    http_status = 401


# Every code a /v1 answer can carry, with its status and what it means; the OpenAPI document is built from
# this table and a test checks that every code raised in the HTTP path is listed here.
ERROR_CODES: dict[str, tuple[int, str]] = {
    "empty_input": (400, "the upload is empty"),
    "corrupt_image": (400, "the bytes could not be decoded as an image"),
    "truncated_image": (400, "the image ends early"),
    "bad_frame_index": (400, "a DICOM frame outside the file was asked for"),
    "bad_request": (400, "the request is malformed (for instance a text value where a file is expected)"),
    "missing_field": (400, "the multipart field with the image is missing"),
    "malformed_multipart": (400, "the multipart/form-data body cannot be parsed"),
    "too_many_files": (400, "more files than the route accepts in one request"),
    "unauthorized": (401, "an API key is required (Authorization: Bearer ... or X-API-Key)"),
    "not_found": (404, "no such route"),
    "no_similar_index": (404, "the service was started without a similar-image index (FUSC_SIMILAR_INDEX)"),
    "method_not_allowed": (405, "the route exists for other methods (see the Allow header)"),
    "index_model_mismatch": (409, "the similar-image index was built with another model than the served one"),
    "image_too_large": (413, "the upload, the request or the decoded image exceeds a limit"),
    "unsupported_format": (415, "not a PNG, JPEG, BMP, TIFF or DICOM image"),
    "unsupported_media_type": (415, "the request is not multipart/form-data"),
    "image_too_small": (422, "a side of the image is below the minimum"),
    "dicom_no_pixel_data": (422, "the DICOM object holds no pixel data"),
    "dicom_not_an_image": (422, "the DICOM object is of a non-image SOP class"),
    "preprocess_failed": (422, "the image decoded but could not be prepared for the model"),
    "internal_error": (500, "a bug; the server log has the traceback"),
    "model_failed": (500, "the model raised on this input; retrying will not help"),
    "backend_unavailable": (503, "the inference backend cannot answer now; retry after Retry-After"),
    "overloaded": (503, "admission control refused the request; retry after Retry-After"),
    "model_not_loaded": (503, "the model repository did not load or is not ready; retry after Retry-After"),
}
