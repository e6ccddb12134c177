"""`/v1/files`: upload, list, retrieve, download and delete files, as OpenAI's
Files API does.

Any key of an organization sees that organization's files and no other's:
another organization's file id is a 404 on every route, as an unknown one.
An upload is a multipart form (`file`, `purpose`, optional
`expires_after[anchor]` and `expires_after[seconds]`), parsed and written to
disk as it arrives (``files/upload.py``); its text fields must come before
the `file` part, as the official SDKs and OpenAI's own examples send them, so
that the purpose's limits apply while the file streams in.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import BinaryIO

import anyio.to_thread
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from flexserve.accounts import Principal
from flexserve.api.auth import principal_of
from flexserve.api.state import Services
from flexserve.errors import InvalidRequestError
from flexserve.files.service import (
    BATCH_MAX_BYTES,
    MAX_TTL,
    MIN_TTL,
    FileRecord,
    Files,
    not_found,
)
from flexserve.files.upload import MultipartUpload

# The purposes FlexServe stores files for: batch input, and files the client
# keeps for itself. (`batch_output` files are made by the batch runner.)
UPLOAD_PURPOSES = ("batch", "user_data")
LIST_LIMIT_MAX = 10_000
_PURPOSE_MAX = 64
_READ_CHUNK = 256 * 1024
_EXPIRES_FIELDS = ("expires_after[anchor]", "expires_after[seconds]")


def _json(document: object) -> Response:
    return Response(orjson.dumps(document), media_type="application/json")


async def _caller(request: Request) -> tuple[Files, Principal]:
    services: Services = request.app.state.services
    principal = await principal_of(request.headers.get("authorization"), services.keys)
    return services.files, principal


async def create_file(request: Request) -> Response:
    """`POST /v1/files` (multipart)."""
    files, principal = await _caller(request)
    upload = MultipartUpload(request.headers.get("content-type"), request.stream())
    try:
        file_found = await upload.read_until_file()
    except ClientDisconnect:
        raise InvalidRequestError("The client left before the upload ended.", param="file") from None
    if not file_found:
        raise InvalidRequestError("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
    purpose = _purpose(upload.leading_fields)
    ttl = _expires_after(upload.leading_fields)
    _no_unknown_fields(upload.leading_fields)
    try:
        record = await files.create(
            principal.org_id,
            purpose,
            upload.filename or "upload",
            upload.file_chunks(),
            ttl=ttl,
            max_bytes=BATCH_MAX_BYTES,
        )
    except ClientDisconnect:
        # Nothing was kept and nobody is left to answer; not a server error.
        raise InvalidRequestError("The client left before the upload ended.", param="file") from None
    if upload.fields != upload.leading_fields:
        # Fields after the file part: what they say was not applied, so the file is not kept.
        await files.delete(principal.org_id, record.id)
        _no_unknown_fields(upload.fields)
        raise InvalidRequestError(
            "The form's fields (`purpose`, `expires_after[…]`) must come before its `file` part.",
            param="file",
            code="invalid_multipart",
        )
    return _json(record.to_openai())


def _no_unknown_fields(fields: dict[str, str]) -> None:
    unknown = set(fields) - {"purpose", *_EXPIRES_FIELDS}
    if unknown:
        name = sorted(unknown)[0][:64]
        raise InvalidRequestError(
            f"Unrecognized form field: '{name}'.", param=name, code="unknown_parameter"
        )


def _purpose(fields: dict[str, str]) -> str:
    purpose = fields.get("purpose")
    if purpose is None:
        raise InvalidRequestError(
            "Missing required parameter: 'purpose' (sent before the `file` part).",
            param="purpose",
            code="missing_required_parameter",
        )
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequestError(
            f"Invalid value for 'purpose': {purpose[:64]!r}; FlexServe stores files for "
            + " and ".join(repr(p) for p in UPLOAD_PURPOSES) + ".",
            param="purpose",
            code="invalid_value",
        )
    return purpose


def _expires_after(fields: dict[str, str]) -> int | None:
    """Seconds after creation the file expires, or None when not asked."""
    anchor, seconds = (fields.get(name) for name in _EXPIRES_FIELDS)
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequestError(
            "Invalid 'expires_after[anchor]': the only anchor is 'created_at'.",
            param="expires_after.anchor",
            code="invalid_value",
        )
    if seconds is None or not seconds.isascii() or not seconds.isdigit() or len(seconds) > 12:
        raise InvalidRequestError(
            "Invalid 'expires_after[seconds]': expected an integer number of seconds.",
            param="expires_after.seconds",
            code="invalid_value",
        )
    ttl = int(seconds)
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise InvalidRequestError(
            f"Invalid 'expires_after[seconds]': must be between {MIN_TTL} and {MAX_TTL}.",
            param="expires_after.seconds",
            code="invalid_value",
        )
    return ttl


async def list_files(request: Request) -> Response:
    """`GET /v1/files`: the organization's files, newest first unless `order=asc`."""
    files, principal = await _caller(request)
    params = request.query_params
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError(
            f"Invalid value for 'order': {order[:16]!r}; expected 'asc' or 'desc'.",
            param="order",
            code="invalid_value",
        )
    raw_limit = params.get("limit")
    limit = LIST_LIMIT_MAX
    if raw_limit is not None:
        if not raw_limit.isascii() or not raw_limit.isdigit() or not 1 <= int(raw_limit[:8]) <= LIST_LIMIT_MAX:
            raise InvalidRequestError(
                f"Invalid value for 'limit': expected an integer from 1 to {LIST_LIMIT_MAX}.",
                param="limit",
                code="invalid_value",
            )
        limit = int(raw_limit)
    purpose = params.get("purpose")
    if purpose is not None and len(purpose) > _PURPOSE_MAX:
        raise InvalidRequestError(
            f"Invalid value for 'purpose': longer than {_PURPOSE_MAX} characters.",
            param="purpose",
            code="invalid_value",
        )
    records, has_more = await files.list(
        principal.org_id,
        purpose=purpose,
        limit=limit,
        order=order,
        after=params.get("after"),
    )
    return _json({
        "object": "list",
        "data": [r.to_openai() for r in records],
        "first_id": records[0].id if records else None,
        "last_id": records[-1].id if records else None,
        "has_more": has_more,
    })


async def retrieve_file(request: Request) -> Response:
    """`GET /v1/files/{file_id}`."""
    files, principal = await _caller(request)
    return _json((await files.get(principal.org_id, request.path_params["file_id"])).to_openai())


async def delete_file(request: Request) -> Response:
    """`DELETE /v1/files/{file_id}`."""
    files, principal = await _caller(request)
    file_id = request.path_params["file_id"]
    await files.delete(principal.org_id, file_id)
    return _json({"id": file_id, "object": "file", "deleted": True})


async def file_content(request: Request) -> Response:
    """`GET /v1/files/{file_id}/content`: the bytes, streamed from disk."""
    files, principal = await _caller(request)
    record: FileRecord = await files.get(principal.org_id, request.path_params["file_id"])
    try:
        handle = await anyio.to_thread.run_sync(open, await files.local_path(record), "rb")
    except FileNotFoundError:
        # Deleted between the lookup and the open.
        raise not_found(record.id) from None
    size = os.fstat(handle.fileno()).st_size
    return StreamingResponse(
        _read(handle, size),
        media_type="application/octet-stream",
        headers={
            "content-length": str(size),
            "content-disposition": f'attachment; filename="{_quoted(record.filename)}"',
        },
    )


async def _read(handle: BinaryIO, size: int) -> AsyncIterator[bytes]:
    """The first ``size`` bytes: what Content-Length announced, even if the
    file grows meanwhile."""
    try:
        while size > 0:
            chunk = await anyio.to_thread.run_sync(handle.read, min(_READ_CHUNK, size))
            if not chunk:
                break
            size -= len(chunk)
            yield chunk
    finally:
        handle.close()


def _quoted(filename: str) -> str:
    return "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
