"""The two transports of ``/graphql/``: a Django view for HTTP, a Channels consumer for websockets."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.urls import reverse
from graphql import GraphQLError, parse
from rest_framework import exceptions
from strawberry.channels import GraphQLWSConsumer
from strawberry.django.views import AsyncGraphQLView
from strawberry.exceptions import ConnectionRejectionError
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types import ExecutionResult
from strawberry.types.graphql import OperationType
from strawberry.types.unset import UNSET, UnsetType
from strawberry.utils.operation import get_operation_type

from media_app.consumers import LayerTolerantConsumer
from media_app.graphql.context import GraphQLContext, authenticate_http, authenticate_websocket, request_from_scope
from media_app.graphql.errors import websocket_required
from media_app.views import ASSET_VERSION

GRAPHIQL_STAFF_ONLY = (
    "GraphiQL is open to staff accounts (log in at {login}). The GraphQL API itself is POST /graphql/ "
    "with your session or 'Authorization: Token <key>'; its schema is schema.graphql.\n"
)


def _is_subscription(query: str | None, operation_name: str | None) -> bool:
    try:
        return get_operation_type(parse(query or ""), operation_name) == OperationType.SUBSCRIPTION
    except (GraphQLError, RuntimeError):
        return False  # not parseable, or no such operation: the schema reports it properly


class MediaGraphQLView(AsyncGraphQLView):
    """HTTP: queries and mutations; GraphiQL in a browser for staff, and for everyone with DEBUG.

    Mounted ``csrf_exempt``: CSRF is enforced by REST's SessionAuthentication instead, which
    applies it to session-authenticated requests only, so token clients need no CSRF token.
    GraphiQL and the React it runs on are served from our static files (the product runs on
    closed networks), not from the CDN that Strawberry's own page uses.
    """

    # Every browser GET without a query reaches render_graphql_ide, which decides who sees it.
    graphql_ide = "graphiql"

    async def get_context(self, request: HttpRequest, response: HttpResponse) -> GraphQLContext:  # type: ignore[override]
        user, auth_error = await sync_to_async(authenticate_http)(request)
        return GraphQLContext(request=request, response=response, user=user, auth_error=auth_error)

    async def execute_single(self, *, request_data: Any, **kwargs: Any) -> ExecutionResult:  # type: ignore[override]
        # Strawberry would run a subscription over plain POST as if it were a query; refuse it clearly.
        if _is_subscription(request_data.query, request_data.operation_name):
            return ExecutionResult(data=None, errors=[websocket_required()])
        return await super().execute_single(request_data=request_data, **kwargs)

    async def render_graphql_ide(self, request: HttpRequest) -> HttpResponse:  # type: ignore[override]
        # The session's user (GraphiQL is a page of this site): staff, or anyone while DEBUG is on.
        user = await request.auser()
        if not settings.DEBUG and not user.is_staff:
            # Strangers learn no more than a 404 would tell, plus where staff log in.
            status = 403 if user.is_authenticated else 404
            login = f"{reverse('login')}?next={request.path}"
            return HttpResponse(GRAPHIQL_STAFF_ONLY.format(login=login), status=status, content_type="text/plain")
        # GraphiQL sends the csrftoken back as X-CSRFToken: render_to_string with the request
        # makes the token (and sets the cookie) through the template's csrf_token.
        content = await sync_to_async(render_to_string)(
            "media_app/graphiql.html", {"asset_version": ASSET_VERSION}, request=request
        )
        return HttpResponse(content)


class MediaGraphQLWSConsumer(LayerTolerantConsumer, GraphQLWSConsumer):
    """Websocket: graphql-transport-ws only (the legacy graphql-ws protocol is not offered).

    Redis trouble is handled as on the status sockets (``LayerTolerantConsumer``): Strawberry
    leaves a subscription's groups but silences a failure, so the groups are left again, with
    retries, once the socket has ended.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("subscription_protocols", (GRAPHQL_TRANSPORT_WS_PROTOCOL,))
        super().__init__(**kwargs)

    @contextlib.asynccontextmanager
    async def listen_to_channel(
        self, type: str, *, timeout: float | None = None, groups: Sequence[str] = ()
    ) -> AsyncGenerator[Any, None]:
        self.groups_joined.update(groups)
        async with super().listen_to_channel(type, timeout=timeout, groups=groups) as events:
            yield events

    async def disconnect(self, code: int) -> None:
        try:
            await super().disconnect(code)  # ends the operations (and their listen_to_channel)
        finally:
            await self.leave_groups()

    async def get_context(self, request: Any, response: Any) -> GraphQLContext:  # type: ignore[override]
        return GraphQLContext(request=request_from_scope(self.scope), consumer=self)

    async def on_ws_connect(self, context: GraphQLContext) -> UnsetType | dict[str, object] | None:  # type: ignore[override]
        try:
            user = await database_sync_to_async(authenticate_websocket)(self.scope, context.connection_params)
        except exceptions.AuthenticationFailed:
            raise ConnectionRejectionError() from None  # closes with 4403
        context.user = user
        if user is not None:
            context.request.user = user
        return UNSET
