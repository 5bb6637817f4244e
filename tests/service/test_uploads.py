"""service/uploads.py: multipart bodies read within limits, refused as early as the problem is known."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from service.errors import FuscError
from service.uploads import read_files

BOUNDARY = "fuscboundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def part(name: str, data: bytes, filename: str | None = "upload.png") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


class Stream:
    """The body in chunks, counting how much of it the reader asked for."""

    def __init__(self, data: bytes, chunk: int = 1000) -> None:
        self.chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        self.consumed = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for c in self.chunks:
            self.consumed += 1
            yield c


def read(data: bytes | Stream, field: str = "images", headers: dict | None = None, **kw):
    stream = data if isinstance(data, Stream) else Stream(data)
    options = dict(max_files=4, max_file_bytes=10_000, max_body_bytes=100_000)
    options.update(kw)
    return asyncio.run(read_files(headers or {"content-type": CONTENT_TYPE}, stream, field, **options))


def error_of(fn) -> FuscError:
    with pytest.raises(FuscError) as info:
        fn()
    return info.value


def test_files_in_order_other_fields_ignored() -> None:
    data = body(part("images", b"a" * 3000), part("note", b"hello", None), part("images", b"b" * 10))
    assert read(data) == [b"a" * 3000, b"b" * 10]


def test_any_number_of_files_over_the_limit_is_too_many_files_at_once() -> None:
    for n in (5, 34, 200):
        stream = Stream(body(*(part("images", b"x" * 500) for _ in range(n))), chunk=700)
        e = error_of(lambda s=stream: read(s))
        assert (e.code, e.http_status) == ("too_many_files", 400)
        assert stream.consumed < 5  # refused on the fifth part's headers, the rest never read


def test_an_oversized_file_is_its_own_error_in_a_batch_and_the_request_error_alone() -> None:
    data = body(part("images", b"a" * 20_000), part("images", b"ok"))
    big, ok = read(data)
    assert isinstance(big, FuscError) and (big.code, big.http_status) == ("image_too_large", 413)
    assert ok == b"ok"
    stream = Stream(body(part("image", b"a" * 50_000)))
    e = error_of(lambda: read(stream, field="image", max_files=1))
    assert e.code == "image_too_large" and stream.consumed < 15


def test_body_over_the_limit_is_413_declared_or_streamed() -> None:
    data = body(part("images", b"a" * 9000), part("images", b"b" * 9000))
    e = error_of(
        lambda: read(
            data, headers={"content-type": CONTENT_TYPE, "content-length": "20000"}, max_body_bytes=15_000
        )
    )
    assert e.code == "image_too_large"
    stream = Stream(data)
    e = error_of(lambda: read(stream, max_body_bytes=15_000))
    assert e.code == "image_too_large" and stream.consumed == 16


def test_every_chunk_is_reported_and_its_refusal_stops_the_read() -> None:
    seen: list[int] = []

    def on_bytes(n: int) -> None:
        seen.append(n)
        if sum(seen) > 2500:
            raise FuscError("busy", code="overloaded", http_status=503)

    stream = Stream(body(part("images", b"a" * 9000)))
    assert error_of(lambda: read(stream, on_bytes=on_bytes)).code == "overloaded"
    assert stream.consumed == 3


@pytest.mark.parametrize(
    ("headers", "data", "code", "status"),
    [
        ({"content-type": "application/json"}, b"{}", "unsupported_media_type", 415),
        ({"content-type": "multipart/form-data"}, body(part("images", b"a")), "malformed_multipart", 400),
        ({"content-type": CONTENT_TYPE}, b"--fuscboundary\r\nno headers end", "malformed_multipart", 400),
        ({"content-type": CONTENT_TYPE}, body(part("picture", b"a")), "missing_field", 400),
        ({"content-type": CONTENT_TYPE}, body(part("images", b"text", None)), "bad_request", 400),
    ],
)
def test_bad_requests(headers: dict, data: bytes, code: str, status: int) -> None:
    e = error_of(lambda: read(data, headers=headers))
    assert (e.code, e.http_status) == (code, status)
