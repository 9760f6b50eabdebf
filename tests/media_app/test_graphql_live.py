"""The GraphQL workflow with real clients against the live ASGI server and the real worker.

Exactly the client contract: ``createMediaUpload`` over HTTP, a PUT of the file to the returned
``uploadUrl``, then ``mediaStatus`` over graphql-transport-ws (the ``gql`` client and its
websockets transport) opened *before* ``completeMediaUpload``, so Pending and the whole
Processing run are observed, up to Completed with outputs, or Failed with its reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import requests
import websockets
from django.test import Client as DjangoClient
from gql import Client, GraphQLRequest
from gql.client import AsyncClientSession
from gql.transport.exceptions import TransportConnectionFailed, TransportQueryError
from gql.transport.websockets import WebsocketsTransport
from rest_framework.authtoken.models import Token

from tests.conftest import TESTDATA

pytestmark = pytest.mark.worker

REAL_VIDEO = TESTDATA / "real" / "realshort.mp4"  # 1.2 s of H.264 + AAC from a phone
# Looks like an MP4 to the sniffer (ftyp box), so it is accepted and fails in the worker's probe.
BROKEN_MP4 = b"\x00\x00\x00\x18ftypisom" + b"\x00" * 5000
FINAL = ("Completed", "Failed")

CREATE = """mutation($name: String!, $size: BigInt!, $type: String!) {
  createMediaUpload(fileName: $name, size: $size, contentType: $type) {
    uploadUrl expiresAt tusUrl item { id processingStatus }
  }
}"""
COMPLETE = "mutation($id: ID!) { completeMediaUpload(mediaId: $id) { id processingStatus } }"
STATUS = """subscription($id: ID!) {
  mediaStatus(mediaId: $id) {
    id seq processingStatus stage progress error { code message }
    outputs { kind url contentType codec width height duration bytes }
  }
}"""


def post_graphql(server: Any, token: str, query: str, **variables: Any) -> dict[str, Any]:
    response = requests.post(
        f"{server.url}/graphql/",
        json={"query": query, "variables": variables},
        headers={"Authorization": f"Token {token}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    return dict(body["data"])


def upload(server: Any, token: str, name: str, data: bytes) -> str:
    """createMediaUpload, then the PUT of the bytes to the presigned URL (no credentials)."""
    created = post_graphql(server, token, CREATE, name=name, size=len(data), type="video/mp4")["createMediaUpload"]
    assert created["item"]["processingStatus"] == "Pending"
    stored = requests.put(created["uploadUrl"], data=data, timeout=60)
    assert stored.status_code == 200, stored.text
    return str(created["item"]["id"])


@asynccontextmanager
async def graphql_ws(server: Any, **auth: Any) -> AsyncIterator[AsyncClientSession]:
    """A graphql-transport-ws session: ``token=`` goes in connection_init, ``cookie=`` on the handshake."""
    headers = {"Origin": server.url}  # the same origin check as every websocket of ours
    if "cookie" in auth:
        headers["Cookie"] = auth["cookie"]
    transport = WebsocketsTransport(
        url=f"{server.ws_url}/graphql/",
        headers=headers,
        init_payload={"Authorization": f"Token {auth['token']}"} if "token" in auth else {},
        subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL],
    )
    async with Client(transport=transport) as session:
        yield session


def status_of(item_id: str) -> GraphQLRequest:
    return GraphQLRequest(STATUS, variable_values={"id": item_id})


async def follow(server: Any, token: str, item_id: str, *, stranger_cookie: str | None = None) -> dict[str, Any]:
    """Subscribe, then complete the upload, then read events until the server ends the stream."""
    found: dict[str, Any] = {"events": []}
    async with graphql_ws(server, token=token) as session:
        events = session.subscribe(status_of(item_id))
        async with asyncio.timeout(240):
            found["events"].append((await anext(events))["mediaStatus"])
            if stranger_cookie is not None:
                async with graphql_ws(server, cookie=stranger_cookie) as other:
                    with pytest.raises(TransportQueryError) as refused:
                        await anext(other.subscribe(status_of(item_id)))
                found["stranger"] = refused.value.errors
            completed = await asyncio.to_thread(post_graphql, server, token, COMPLETE, id=item_id)
            found["completed"] = completed["completeMediaUpload"]
            async for result in events:  # ends when the server completes the subscription
                found["events"].append(result["mediaStatus"])
    return found


def session_cookie(user: Any) -> str:
    client = DjangoClient()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def test_upload_then_watch_pending_processing_completed_while_a_stranger_is_refused(
    asgi_server, celery_worker, make_user
):
    token = Token.objects.create(user=make_user()).key
    item_id = upload(asgi_server, token, "realshort.mp4", REAL_VIDEO.read_bytes())

    found = asyncio.run(follow(asgi_server, token, item_id, stranger_cookie=session_cookie(make_user())))

    # Another user, logged in by session cookie, learns nothing about the item.
    [refusal] = found["stranger"]
    assert refusal["message"] == "There is no such item." and refusal["extensions"]["code"] == "not_found"

    events = found["events"]
    statuses = [e["processingStatus"] for e in events]
    assert statuses[0] == "Pending" and statuses[-1] == "Completed"
    assert "Processing" in statuses
    assert statuses == sorted(statuses, key=["Pending", "Processing", "Completed"].index)
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress) and progress[-1] == 100
    assert len({p for e, p in zip(events, progress, strict=True) if e["processingStatus"] == "Processing"}) > 1
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [e["stage"] for e in events if e["processingStatus"] == "Processing"][-1] in ("previews", "store")
    assert all(e["outputs"] == [] for e in events[:-1])

    final = events[-1]
    assert final["error"] is None
    outputs = {o["kind"]: o for o in final["outputs"]}
    assert {"video", "thumbnail", "manifest"} <= set(outputs)
    video = outputs["video"]
    assert video["contentType"] == "video/webm" and video["codec"].startswith("av1")
    assert (video["width"], video["height"]) == (320, 240) and video["duration"] == pytest.approx(1.2, abs=0.2)
    body = requests.get(video["url"], timeout=30)  # the signed URL is the credential
    assert body.status_code == 200 and len(body.content) == video["bytes"]
    assert body.content[:4] == b"\x1a\x45\xdf\xa3"  # WebM (EBML)
    assert outputs["thumbnail"]["contentType"] == "image/webp"


def test_a_file_that_cannot_be_decoded_ends_failed_with_its_reason(asgi_server, celery_worker, make_user):
    token = Token.objects.create(user=make_user()).key
    item_id = upload(asgi_server, token, "broken.mp4", BROKEN_MP4)

    events = asyncio.run(follow(asgi_server, token, item_id))["events"]

    assert events[0]["processingStatus"] == "Pending"
    last = events[-1]
    assert last["processingStatus"] == "Failed" and last["outputs"] == []
    assert last["error"]["code"] == "invalid_input" and last["error"]["message"]


def test_websocket_credentials_are_checked_at_connection_init(asgi_server, make_user):
    token = Token.objects.create(user=make_user()).key
    item_id = upload(asgi_server, token, "realshort.mp4", REAL_VIDEO.read_bytes())

    async def scenario() -> tuple[Any, Any]:
        async with graphql_ws(asgi_server, token=token) as owner:  # queries run over the socket too
            mine = await owner.execute(GraphQLRequest("{ mediaItems { totalCount edges { node { id } } } }"))
            assert mine["mediaItems"]["edges"] == [{"node": {"id": item_id}}]
        async with graphql_ws(asgi_server) as anonymous:
            with pytest.raises(TransportQueryError) as unauthenticated:
                await anext(anonymous.subscribe(status_of("00000000-0000-0000-0000-000000000000")))
        with pytest.raises(TransportConnectionFailed) as rejected:
            async with graphql_ws(asgi_server, token="not-a-token") as session:
                await anext(session.subscribe(status_of("00000000-0000-0000-0000-000000000000")))
        return unauthenticated.value.errors, rejected.value

    errors, failed = asyncio.run(scenario())
    assert errors[0]["extensions"]["code"] == "not_authenticated"
    # A refused token closes the socket at connection_init with graphql-transport-ws's 4403.
    closed = failed.__cause__
    assert isinstance(closed, websockets.ConnectionClosed) and closed.rcvd is not None
    assert (closed.rcvd.code, closed.rcvd.reason) == (4403, "Forbidden")
