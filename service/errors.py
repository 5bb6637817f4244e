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
