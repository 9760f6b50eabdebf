"""Token clients need no ``Origin`` on any websocket; the Origin check still guards the cookie.

Real clients (``websockets`` and gql's graphql-transport-ws transport) against the live server,
sending no ``Origin`` header, as programs do. Every refusal is a close with a code and a reason
a person can read, never a bare 1006.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets
from django.test import Client as DjangoClient
from gql import Client, GraphQLRequest
from gql.transport.exceptions import TransportConnectionFailed, TransportQueryError
from gql.transport.websockets import WebsocketsTransport
from rest_framework.authtoken.models import Token

from media_app.services import media_item_create

pytestmark = pytest.mark.django_db(transaction=True)
STATUS = "subscription($id: ID!) { mediaStatus(mediaId: $id) { id processingStatus retryable } }"
ITEMS = "{ mediaItems { edges { node { id } } } }"


@pytest.fixture
def owner(make_user: Any) -> dict[str, Any]:
    user = make_user()
    item = media_item_create(owner=user, original_name="clip.mp4", size=1000)
    client = DjangoClient()
    client.force_login(user)
    return {
        "token": Token.objects.create(user=user).key,
        "item": str(item.pk),
        "cookie": f"sessionid={client.cookies['sessionid'].value}",
    }


async def first_message(url: str, headers: dict[str, str]) -> dict[str, Any]:
    async with websockets.connect(url, additional_headers=headers, open_timeout=10) as ws:
        return dict(json.loads(await asyncio.wait_for(ws.recv(), 10)))


async def refusal(url: str, headers: dict[str, str]) -> tuple[int, str]:
    """The close code and reason of a socket the server accepts and then closes."""
    async with websockets.connect(url, additional_headers=headers, open_timeout=10) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None, "closed without a close frame (1006)"
    return closed.value.rcvd.code, closed.value.rcvd.reason


def test_status_sockets_take_a_token_without_origin(asgi_server, owner):
    token = {"Authorization": f"Token {owner['token']}"}
    base = f"{asgi_server.ws_url}/ws/media/"

    listed = asyncio.run(first_message(base, token))
    one = asyncio.run(first_message(f"{base}{owner['item']}/", token))

    assert listed["item"]["id"] == owner["item"] and one["item"]["id"] == owner["item"]
    assert one["item"]["retryable"] is False  # Pending: nothing to retry
    # From a page of another site a token still works: it is not ambient like a cookie.
    foreign = asyncio.run(first_message(base, {**token, "Origin": "https://elsewhere.example"}))
    assert foreign["item"]["id"] == owner["item"]


def test_status_sockets_refuse_with_a_code_and_a_reason(asgi_server, owner):
    base = f"{asgi_server.ws_url}/ws/media/"

    code, reason = asyncio.run(refusal(base, {"Authorization": "Token not-a-token"}))
    assert (code, reason) == (4401, "Invalid token.")
    code, reason = asyncio.run(refusal(f"{base}{owner['item']}/", {}))
    assert code == 4401 and "Authorization: Token" in reason
    # A cookie without an Origin is not a browser's: it does not count.
    code, reason = asyncio.run(refusal(base, {"Cookie": owner["cookie"]}))
    assert code == 4401 and "log in" in reason
    token = {"Authorization": f"Token {owner['token']}"}
    code, reason = asyncio.run(refusal(f"{base}00000000-0000-0000-0000-000000000000/", token))
    assert (code, reason) == (4404, "There is no such item.")

    # The cookie from another site's page is still refused at the handshake (the Origin check).
    with pytest.raises(websockets.InvalidStatus) as refused:
        asyncio.run(first_message(base, {"Cookie": owner["cookie"], "Origin": "https://evil.example"}))
    assert refused.value.response.status_code == 403
    # And from our own page it is the session, as before.
    mine = asyncio.run(first_message(base, {"Cookie": owner["cookie"], "Origin": asgi_server.url}))
    assert mine["item"]["id"] == owner["item"]


def graphql_client(server: Any, *, init: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Any:
    """gql's graphql-transport-ws client as a program uses it: no Origin header."""
    transport = WebsocketsTransport(
        url=f"{server.ws_url}/graphql/",
        headers=headers or {},
        init_payload=init or {},
        subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL],
    )
    return Client(transport=transport)


def test_graphql_ws_takes_a_token_without_origin(asgi_server, owner):
    async def scenario() -> tuple[Any, Any, Any]:
        async with graphql_client(asgi_server, init={"Authorization": f"Token {owner['token']}"}) as session:
            listed = await session.execute(GraphQLRequest(ITEMS))
            first = await anext(session.subscribe(GraphQLRequest(STATUS, variable_values={"id": owner["item"]})))
        async with graphql_client(asgi_server, headers={"Authorization": f"Token {owner['token']}"}) as session:
            by_header = await session.execute(GraphQLRequest(ITEMS))
        return listed, first, by_header

    listed, first, by_header = asyncio.run(scenario())
    assert listed["mediaItems"]["edges"] == [{"node": {"id": owner["item"]}}]
    assert first["mediaStatus"] == {"id": owner["item"], "processingStatus": "Pending", "retryable": False}
    assert by_header == listed


def test_graphql_ws_refusals_are_readable(asgi_server, owner):
    async def scenario() -> tuple[Any, Any, Any]:
        with pytest.raises(TransportConnectionFailed) as bad_token:
            async with graphql_client(asgi_server, init={"Authorization": "Token not-a-token"}) as session:
                await session.execute(GraphQLRequest(ITEMS))
        # No credentials (a cookie without Origin does not count): each operation says so.
        async with graphql_client(asgi_server, headers={"Cookie": owner["cookie"]}) as session:
            with pytest.raises(TransportQueryError) as anonymous:
                await session.execute(GraphQLRequest(ITEMS))
        return bad_token.value, anonymous.value, None

    bad_token, anonymous, _ = asyncio.run(scenario())
    closed = bad_token.__cause__
    assert isinstance(closed, websockets.ConnectionClosed) and closed.rcvd is not None
    assert (closed.rcvd.code, closed.rcvd.reason) == (4403, "Forbidden")  # graphql-transport-ws's refusal
    assert anonymous.errors[0]["extensions"]["code"] == "not_authenticated"
