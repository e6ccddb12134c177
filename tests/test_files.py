"""`/v1/files` through the official SDK against a real gateway: upload, list,
retrieve, download, delete; the batch limits; expiry; and that another
organization sees none of it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import update

from conftest import Gateway, sim_engine
from flexserve.files import BATCH_MAX_BYTES, BATCH_MAX_LINES
from flexserve.store.database import Database
from flexserve.store.schema import files as files_table
from openapi import validate

LINES = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n' * 3


@pytest.fixture(scope="module")
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    return start_gateway(engines=[sim_engine(profile="instant")], engine="sim")


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with gateway.client() as c:
        yield c


def _stored(gateway: Gateway) -> set[str]:
    """The content files on disk."""
    root = Path(gateway.settings.home) / "files"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def _list_ids(client: openai.OpenAI, **kw: object) -> list[str]:
    return [f.id for f in client.files.list(**kw).data]  # type: ignore[arg-type]


def test_the_sdk_uploads_lists_retrieves_downloads_and_deletes(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    created = client.files.create(file=("input.jsonl", LINES), purpose="batch")
    document = created.model_dump(exclude_none=True)
    validate(document, "OpenAIFile")
    assert created.id.startswith("file-") and len(created.id) == len("file-") + 24
    assert (created.bytes, created.filename, created.purpose) == (len(LINES), "input.jsonl", "batch")
    # A batch file without expires_after expires after 30 days, as at OpenAI.
    assert created.expires_at == created.created_at + 30 * 24 * 3600
    assert created.id in _stored(gateway)

    retrieved = client.files.retrieve(created.id)
    assert retrieved == created
    assert client.files.content(created.id).content == LINES

    with gateway.http() as http:
        page = http.get("/v1/files").json()
    validate(page, "ListFilesResponse")
    assert created.id in [f["id"] for f in page["data"]]

    deleted = client.files.delete(created.id)
    validate(deleted.model_dump(), "DeleteFileResponse")
    assert (deleted.id, deleted.deleted) == (created.id, True)
    assert created.id not in _stored(gateway)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(created.id)


def test_expires_after_sets_expires_at_and_is_bounded(client: openai.OpenAI) -> None:
    created = client.files.create(
        file=("a.jsonl", LINES),
        purpose="user_data",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert created.expires_at == created.created_at + 3600
    kept = client.files.create(file=("b.txt", b"notes"), purpose="user_data")
    assert kept.expires_at is None
    validate(kept.model_dump(exclude_none=True), "OpenAIFile")
    for seconds in (3599, 2592001):
        with pytest.raises(openai.BadRequestError) as refused:
            client.files.create(
                file=("a.jsonl", LINES),
                purpose="batch",
                expires_after={"anchor": "created_at", "seconds": seconds},
            )
        assert refused.value.body["param"] == "expires_after.seconds"  # type: ignore[index]


def test_list_pages_in_order_and_filters_by_purpose(
    start_gateway: Callable[..., Gateway],
) -> None:
    gateway = start_gateway(engines=[sim_engine(profile="instant")], engine="sim")
    with gateway.client() as client:
        ids = [client.files.create(file=(f"{i}.jsonl", LINES), purpose="batch").id for i in range(3)]
        other = client.files.create(file=("x.txt", b"x"), purpose="user_data").id
        ascending = _list_ids(client, order="asc", purpose="batch")
        assert ascending == ids  # in upload order, even within one second
        assert _list_ids(client, purpose="batch") == ascending[::-1]  # newest first by default
        assert _list_ids(client, purpose="user_data") == [other]

        first = client.files.list(order="asc", purpose="batch", limit=2)
        assert [f.id for f in first.data] == ascending[:2] and first.has_more
        second = client.files.list(order="asc", purpose="batch", limit=2, after=ascending[1])
        assert [f.id for f in second.data] == ascending[2:] and not second.has_more
        # The SDK's iterator follows the pages.
        assert [f.id for f in client.files.list(order="asc", limit=1)] == [*ids, other]

        with gateway.http() as http:
            for query in ({"limit": "0"}, {"limit": "10001"}, {"order": "up"}, {"after": "file-x"}):
                answer = http.get("/v1/files", params=query)
                assert answer.status_code == 400, (query, answer.text)
                assert answer.json()["error"]["param"] == next(iter(query))


def test_a_batch_file_over_the_line_limit_is_refused_and_not_kept(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    before = _stored(gateway)
    line = b'{"custom_id": "x"}\n'
    # Blank lines do not count.
    at_limit = client.files.create(file=("ok.jsonl", line * BATCH_MAX_LINES + b"\n\n"), purpose="batch")
    assert at_limit.bytes == len(line) * BATCH_MAX_LINES + 2
    client.files.delete(at_limit.id)

    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("big.jsonl", line * BATCH_MAX_LINES + b"{}"), purpose="batch")
    assert str(BATCH_MAX_LINES) in refused.value.message
    assert refused.value.code == "too_many_lines"
    assert _stored(gateway) == before


def test_a_batch_file_over_the_size_limit_is_refused_while_it_streams(gateway: Gateway) -> None:
    sent = 0

    def body() -> Iterator[bytes]:
        # One long line, sent in pieces without a Content-Length: the gateway
        # must count as it reads.
        nonlocal sent
        yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="f.jsonl"\r\n\r\n'
        piece = b"x" * (4 * 1024 * 1024)
        while sent <= BATCH_MAX_BYTES + len(piece):
            sent += len(piece)
            yield piece
        yield b"\r\n--b--\r\n"

    before = _stored(gateway)
    with gateway.http() as http:
        answer = http.post(
            "/v1/files", content=body(), headers={"content-type": "multipart/form-data; boundary=b"}
        )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "file_too_large"
    assert str(BATCH_MAX_BYTES) in answer.json()["error"]["message"]
    assert _stored(gateway) == before


@pytest.mark.parametrize(
    ("parts", "param"),
    [
        ([("file", ("a.jsonl", LINES))], "purpose"),
        ([("purpose", (None, "batch"))], "file"),
        ([("purpose", (None, "fine-tune")), ("file", ("a.jsonl", LINES))], "purpose"),
        ([("purpose", (None, "batch")), ("file", (None, LINES))], "file"),
        ([("purpose", (None, "batch")), ("color", (None, "red")), ("file", ("a", LINES))], "color"),
        # Fields come before the file: one after it is refused, and the file not kept.
        ([("file", ("a.jsonl", LINES)), ("purpose", (None, "batch"))], "purpose"),
        (
            [("purpose", (None, "batch")), ("file", ("a.jsonl", LINES)),
             ("expires_after[anchor]", (None, "created_at"))],
            "file",
        ),
        (
            [("purpose", (None, "batch")), ("expires_after[anchor]", (None, "now")),
             ("expires_after[seconds]", (None, "3600")), ("file", ("a", LINES))],
            "expires_after.anchor",
        ),
    ],
)
def test_malformed_uploads_are_refused_in_the_envelope(
    gateway: Gateway, parts: list[tuple[str, tuple[str | None, object]]], param: str
) -> None:
    before = _stored(gateway)
    with gateway.http() as http:
        answer = http.post("/v1/files", files=parts)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert _stored(gateway) == before


def test_a_body_that_is_not_multipart_is_refused(gateway: Gateway) -> None:
    with gateway.http() as http:
        for headers, content in (
            ({"content-type": "application/json"}, b"{}"),
            ({"content-type": "multipart/form-data; boundary=b"}, b"--b\r\nnonsense"),
            ({"content-type": "multipart/form-data; boundary=b"}, b""),
        ):
            answer = http.post("/v1/files", content=content, headers=headers)
            assert answer.status_code == 400, answer.text
            assert "error" in answer.json()


def test_another_organizations_file_is_not_found_on_every_route(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    mine = client.files.create(file=("mine.jsonl", LINES), purpose="batch")
    other_key = gateway.new_key("files-other-org")
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=other_key, max_retries=0) as other:
        assert mine.id not in [f.id for f in other.files.list()]
        with pytest.raises(openai.NotFoundError):
            other.files.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            other.files.content(mine.id)
        with pytest.raises(openai.NotFoundError):
            other.files.delete(mine.id)
        with pytest.raises(openai.BadRequestError):  # not a cursor it can use either
            other.files.list(after=mine.id)
        theirs = other.files.create(file=("theirs.jsonl", LINES), purpose="batch")
        assert [f.id for f in other.files.list()] == [theirs.id]
    assert client.files.content(mine.id).content == LINES
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(theirs.id)
    with httpx.Client(base_url=gateway.url) as anonymous:
        assert anonymous.get(f"/v1/files/{mine.id}").status_code == 401


def _expire(gateway: Gateway, *file_ids: str) -> None:
    async def run() -> None:
        db = Database.from_url(gateway.db_url)
        try:
            async with db.engine.begin() as conn:
                await conn.execute(
                    update(files_table).where(files_table.c.id.in_(file_ids)).values(expires_at=1)
                )
        finally:
            await db.close()

    asyncio.run(run())


def test_expired_files_are_gone_and_their_content_deleted(
    gateway: Gateway, client: openai.OpenAI
) -> None:
    looked_up = client.files.create(file=("a.jsonl", LINES), purpose="batch")
    listed = client.files.create(file=("b.jsonl", LINES), purpose="batch")
    _expire(gateway, looked_up.id, listed.id)

    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(looked_up.id)
    assert looked_up.id not in _stored(gateway)
    with pytest.raises(openai.NotFoundError):
        client.files.content(looked_up.id)

    assert listed.id in _stored(gateway)
    assert listed.id not in _list_ids(client)
    assert listed.id not in _stored(gateway)


def test_an_upload_cut_short_leaves_nothing_behind(gateway: Gateway) -> None:
    host, port = gateway.url.removeprefix("http://").split(":")
    head = (
        b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f.jsonl\"\r\n\r\n"
    )
    # Long lines: a few megabytes, well under both batch limits.
    body = head + (b'{"custom_id": "x", "pad": "' + b"a" * 4000 + b'"}\n') * 1000
    before = _stored(gateway)
    root = Path(gateway.settings.home) / "files"

    def partial() -> bool:
        return root.exists() and any(p.name.endswith(".part") for p in root.iterdir())

    async def send_half() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {gateway.api_key}\r\n".encode()
            + b"Content-Type: multipart/form-data; boundary=b\r\n"
            + f"Content-Length: {len(body) * 2}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        # The gateway is writing the file when the client leaves.
        deadline = time.monotonic() + 10
        while not partial() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert partial(), await reader.read(1000)
        writer.close()
        await writer.wait_closed()

    asyncio.run(send_half())
    deadline = time.monotonic() + 10
    while partial() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not partial()
    assert _stored(gateway) == before
