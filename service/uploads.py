"""Uploads: the image files of a multipart/form-data body, read as it streams, within the limits.

Each file part of the expected field is collected straight into memory, once (no spooling to disk and
reading back); a file past ``max_file_bytes`` stops being collected at once and becomes that item's
``image_too_large``; a body past ``max_body_bytes`` or with more files than allowed is refused as soon as
that is known, without reading the rest. Every chunk is reported to ``on_bytes`` (the admission ticket's
running count, which refuses a body without Content-Length once the service holds too many bytes).

The caller's file names are parsed by the multipart parser but never kept: they may name the patient.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import BadRequestError, FuscError, ImageTooLargeError

# Other form fields (a note, a client id) are skipped but bounded.
MAX_OTHER_PARTS = 16


class _Reader:
    def __init__(self, field: str, max_files: int, max_file_bytes: int) -> None:
        self.field = field.encode()
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes
        self.items: list[bytearray | FuscError] = []
        self.other_parts = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._current: bytearray | None = None  # the file part being collected
        self._collecting = False

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._current = None
        self._collecting = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise BadRequestError(
                'a multipart part has no Content-Disposition "name"', code="malformed_multipart"
            )
        if options[b"name"] != self.field:
            self.other_parts += 1
            if self.other_parts > MAX_OTHER_PARTS:
                raise BadRequestError(f"the body has more than {MAX_OTHER_PARTS} other form fields")
            return
        if b"filename" not in options:
            raise BadRequestError(
                f"the field '{self.field.decode()}' must be a file upload, not a text value"
            )
        if len(self.items) >= self.max_files:
            raise BadRequestError(
                f"at most {self.max_files} file(s) may be sent in '{self.field.decode()}' per request",
                code="too_many_files",
            )
        self._current = bytearray()
        self._collecting = True
        self.items.append(self._current)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._collecting or self._current is None:
            return
        if len(self._current) + (end - start) > self.max_file_bytes:
            error = ImageTooLargeError(f"the upload is larger than the limit of {self.max_file_bytes} bytes")
            if self.max_files == 1:
                raise error  # the only file: the whole request is answered now
            self.items[-1] = error
            self._current = None
            self._collecting = False
            return
        self._current += memoryview(data)[start:end]

    def on_part_end(self) -> None:
        self._current = None
        self._collecting = False


async def read_files(
    headers: dict[str, str] | object,
    stream: AsyncIterator[bytes],
    field: str,
    *,
    max_files: int,
    max_file_bytes: int,
    max_body_bytes: int,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> list[bytes | FuscError]:
    """The files of multipart ``field``, in order: bytes, or an item's own error (``image_too_large``).

    ``headers`` is the request's header mapping (``content-type`` and ``content-length`` are read).
    Raises BadRequestError (400/415), ImageTooLargeError (413) for the request as a whole, or whatever
    ``on_bytes`` raises (OverloadedError).
    """
    get = headers.get  # type: ignore[attr-defined]
    content_type = get("content-type") or ""
    if not content_type.lower().startswith("multipart/form-data"):
        raise BadRequestError(
            f"send the image as a multipart/form-data file field named '{field}'",
            code="unsupported_media_type",
            http_status=415,
        )
    declared = get("content-length") or ""
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise ImageTooLargeError(f"the request body is larger than the limit of {max_body_bytes} bytes")
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequestError("the multipart/form-data body has no boundary", code="malformed_multipart")
    reader = _Reader(field, max_files, max_file_bytes)
    callbacks = {
        name: getattr(reader, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
        )
    }
    total = 0
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        async for chunk in stream:
            total += len(chunk)
            if total > max_body_bytes:
                raise ImageTooLargeError(
                    f"the request body is larger than the limit of {max_body_bytes} bytes"
                )
            on_bytes(len(chunk))
            parser.write(chunk)
        parser.finalize()
    except FuscError:
        raise
    except (FormParserError, ValueError, KeyError) as exc:
        raise BadRequestError(
            "the multipart/form-data body is malformed", code="malformed_multipart"
        ) from exc
    if not reader.items:
        raise BadRequestError(f"the multipart field '{field}' is missing", code="missing_field")
    files: list[bytes | FuscError] = []
    while reader.items:
        # One copy at a time, each buffer dropped as soon as its bytes exist.
        item = reader.items.pop(0)
        files.append(bytes(item) if isinstance(item, bytearray) else item)
        del item
    return files
