"""`POST /v1/files`'s multipart body, parsed as it arrives.

python-multipart's push parser is fed the request body chunk by chunk; the
``file`` part's bytes are handed on as they are parsed (to be written to
disk), and the other parts, small text fields, are kept up to a few
kilobytes each. Nothing holds more than one received chunk of the file, so
memory stays flat whatever the upload's size (Starlette's ``request.form()``
would first spool the whole file to a temporary file of its own, and the
store would then copy it again).

The fields a request sends before its ``file`` part (the official SDKs send
``purpose`` first) are known when the file starts; a field sent after it is
read once the file is stored, and the upload is refused then if it is wrong.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from flexserve.errors import InvalidRequestError

# The text fields of an upload, and the most bytes kept of each.
_FIELD_MAX_BYTES = 1024
_MAX_PARTS = 16
_FILENAME_MAX = 255


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)


class MultipartUpload:
    """One upload's multipart stream: ``file_chunks()`` yields the ``file``
    part's content; ``fields`` holds the other parts (all of them once
    ``file_chunks()`` is exhausted), ``leading_fields`` those before the
    file; ``filename`` is the file part's name."""

    def __init__(self, content_type: str | None, body: AsyncIterator[bytes]) -> None:
        kind, options = parse_options_header(content_type or "")
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise InvalidRequestError(
                "Expected a multipart/form-data body with a boundary (fields `file` and `purpose`).",
                param=None,
                code="invalid_content_type",
            )
        self._body = body.__aiter__()
        self.fields: dict[str, str] = {}
        # The fields sent before the `file` part (one chunk may hold more).
        self.leading_fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_seen = False
        self._parts = 0
        self._part = _Part()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._value = bytearray()
        self._file_data: list[bytes] = []
        self._in_file = False
        self._ended = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )

    # The parser's callbacks (called synchronously from ``write``).

    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > _MAX_PARTS:
            raise _malformed(f"The form has more than {_MAX_PARTS} parts.")
        self._part = _Part()
        self._value = bytearray()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._part.headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field = bytearray()
        self._header_value = bytearray()

    def _on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._part.headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise _malformed("A part of the form has no Content-Disposition name.")
        self._part.name = options[b"name"].decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is not None:
            self._part.filename = filename.decode("utf-8", "replace")
        if self._part.name == "file":
            if self.file_seen:
                raise _malformed("The form has more than one `file` part.", param="file")
            if self._part.filename is None:
                # A plain text field, not a file: the form was not made by a client uploading one.
                raise _malformed("The `file` part must be a file (with a filename).", param="file")
            self.file_seen = True
            self.leading_fields = dict(self.fields)
            self._in_file = True
            self.filename = _clean_filename(self._part.filename)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._file_data.append(data[start:end])
            return
        self._value += data[start:end]
        if len(self._value) > _FIELD_MAX_BYTES:
            raise _malformed(
                f"The form field `{self._part.name}` is longer than {_FIELD_MAX_BYTES} bytes.",
                param=self._part.name,
            )

    def _on_part_end(self) -> None:
        if self._in_file:
            self._in_file = False
            return
        name = self._part.name
        if name in self.fields:
            raise _malformed(f"The form field `{name}` is given more than once.", param=name)
        try:
            self.fields[name] = self._value.decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed(f"The form field `{name}` is not UTF-8.", param=name) from None

    def _on_end(self) -> None:
        self._ended = True

    # Reading.

    def _feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise _malformed(f"The multipart body is malformed: {exc}") from None

    async def read_until_file(self) -> bool:
        """Parse until the ``file`` part begins (True) or the body ends (False)."""
        while not self.file_seen:
            chunk = await self._next_chunk()
            if chunk is None:
                return False
            self._feed(chunk)
        return True

    async def _next_chunk(self) -> bytes | None:
        while True:
            try:
                chunk = await anext(self._body)
            except StopAsyncIteration:
                return None
            if chunk:
                return chunk

    async def file_chunks(self) -> AsyncIterator[bytes]:
        """The ``file`` part's content, then the rest of the form read."""
        while True:
            if self._file_data:
                data, self._file_data = self._file_data, []
                for piece in data:
                    if piece:
                        yield piece
            if self._ended:
                break
            chunk = await self._next_chunk()
            if chunk is None:
                raise _malformed("The multipart body ends before its closing boundary.")
            self._feed(chunk)
        self._parser.finalize()


def _clean_filename(name: str | None) -> str:
    """The name to show: its last path component, without control characters."""
    if not name:
        return "upload"
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())
    return name[:_FILENAME_MAX] or "upload"


def _malformed(message: str, *, param: str | None = None) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="invalid_multipart")
