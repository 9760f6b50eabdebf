"""Who is calling: the REST API's authentication, applied to GraphQL over HTTP and websockets.

HTTP runs REST's own authenticators (``REST_FRAMEWORK["DEFAULT_AUTHENTICATION_CLASSES"]``: a
token, then the session with its CSRF check), so a token needs no CSRF token and a session POST
keeps CSRF protection. A websocket is authenticated once, at ``connection_init``: the token in
its payload (``{"Authorization": "Token …"}``, as browsers cannot set headers on a websocket), a
token header on the handshake, or else the session cookie (Channels' AuthMiddlewareStack), which
counts only on a handshake whose ``Origin`` is ours (``media_app.consumers.SessionForOwnPages``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.request import Request
from rest_framework.settings import api_settings
from strawberry.channels import ChannelsConsumer


@dataclass
class GraphQLContext:
    """Per HTTP request, or per websocket connection (shared by its operations)."""

    # The HTTP request, or one made from the websocket's scope: absolute URLs are built from its
    # (validated) host, and the create throttle and ownership checks read its ``user``.
    request: HttpRequest
    response: HttpResponse | None = None
    # The websocket consumer: subscriptions listen to channel groups through it.
    consumer: ChannelsConsumer | None = None
    connection_params: dict[str, Any] = field(default_factory=dict)
    user: Any = None
    # Credentials were presented and refused (a bad token, a CSRF failure): reported per field.
    auth_error: exceptions.APIException | None = None

    def __getitem__(self, key: str) -> Any:
        # Strawberry's own helpers read ``info.context["request"]``.
        return getattr(self, key)

    def require_user(self) -> Any:
        """The authenticated user, or the REST refusal (not_authenticated / authentication_failed)."""
        if self.auth_error is not None:
            raise self.auth_error
        if self.user is None:
            raise exceptions.NotAuthenticated()
        return self.user


def authenticate_http(request: HttpRequest) -> tuple[Any, exceptions.APIException | None]:
    """(user or None, refusal or None) by the REST authenticators; sync (it reads the database)."""
    # The session's CSRF check reads form fields through DRF's parsers, which consume the body
    # stream: reading ``body`` first caches it, so the GraphQL view still finds the query there.
    request.body  # noqa: B018
    drf_request = Request(
        request,
        parsers=[parser() for parser in api_settings.DEFAULT_PARSER_CLASSES],
        authenticators=[auth() for auth in api_settings.DEFAULT_AUTHENTICATION_CLASSES],
    )
    try:
        user = drf_request.user  # DRF also sets it on the Django request, for the throttle
    except exceptions.APIException as exc:
        return None, exc
    return (user if user.is_authenticated else None), None


def authenticate_websocket(scope: dict[str, Any], params: dict[str, Any]) -> Any:
    """The user of a websocket, or None; raises AuthenticationFailed for a refused token. Sync."""
    header = _token_header(params) or _handshake_header(scope)
    if header:
        keyword, _, key = header.strip().partition(" ")
        if keyword.lower() != TokenAuthentication.keyword.lower() or not key.strip() or " " in key.strip():
            raise exceptions.AuthenticationFailed()
        user, _token = TokenAuthentication().authenticate_credentials(key.strip())
        return user
    user = scope.get("user")
    return user if user is not None and user.is_authenticated else None


def request_from_scope(scope: dict[str, Any]) -> HttpRequest:
    """A Django request standing for a websocket, so URLs are built (and hosts checked) as over HTTP."""
    http_scope = {
        **scope,
        "type": "http",
        "method": "GET",
        "scheme": "https" if scope.get("scheme") == "wss" else "http",
    }
    return ASGIRequest(http_scope, io.BytesIO())


def _token_header(params: dict[str, Any]) -> str:
    for name, value in params.items():
        if isinstance(name, str) and name.lower() == "authorization" and isinstance(value, str):
            return value
    return ""


def _handshake_header(scope: dict[str, Any]) -> str:
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            return bytes(value).decode("latin1")
    return ""
