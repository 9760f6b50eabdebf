"""REST's refusals as GraphQL errors: the same code (in ``extensions.code``) and the same sentence.

The mapping is the REST API's own exception handler, called rather than copied, so a client
switching between the two faces reads identical codes and messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.http import Http404
from graphql import GraphQLError
from rest_framework import exceptions
from strawberry.extensions import MaskErrors

from media_app.api.errors import exception_handler
from media_app.uploads import UploadRefused

# What the services and the REST plumbing raise for a request the rules refuse.
REFUSALS: tuple[type[Exception], ...] = (UploadRefused, exceptions.APIException, Http404)
INTERNAL_MESSAGE = "Something went wrong on our side; try again later."

P = ParamSpec("P")
T = TypeVar("T")
C = TypeVar("C")


def api_error(exc: Exception) -> GraphQLError:
    """The GraphQL error for a refusal, shaped by the REST exception handler."""
    response = exception_handler(exc, {})
    if response is None:  # pragma: no cover - every REFUSALS type is handled
        raise exc
    body: dict[str, Any] = dict(response.data["error"])
    extensions: dict[str, Any] = {"code": body.pop("code")}
    message = body.pop("message")
    extensions.update(body)  # e.g. "fields" of a validation error
    return GraphQLError(message, extensions=extensions, original_error=exc)


def not_found() -> GraphQLError:
    return api_error(exceptions.NotFound())


def refused(code: str, message: str) -> GraphQLError:
    """A refusal that exists only in GraphQL (e.g. a subscription sent over HTTP)."""
    return GraphQLError(message, extensions={"code": code})


def websocket_required() -> GraphQLError:
    return refused("websocket_required", "Subscribe over the graphql-transport-ws websocket at /graphql/.")


def is_expected(error: GraphQLError) -> bool:
    """A coded refusal, or an error about the request itself (syntax, validation, variables).

    Only execution errors have a ``path``; one without a code is an exception nobody meant to show.
    """
    return bool((error.extensions or {}).get("code")) or not error.path


class MaskUnexpectedErrors(MaskErrors):
    """Hide the text of unexpected exceptions (it may carry internals); keep every coded refusal."""

    def __init__(self) -> None:
        super().__init__(should_mask_error=lambda error: not is_expected(error), error_message=INTERNAL_MESSAGE)

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        masked = super().anonymise_error(error)
        masked.extensions = {"code": "internal_error"}
        return masked


async def call_sync(context: C, fn: Callable[Concatenate[C, P], T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(context, …)``, sync (ORM, Redis lock, storage), off the event loop; refusals become errors.

    Over HTTP, Django's handler closes the database connection when the request ends. A websocket
    lives for hours, so there each call checks its connection first, as Channels' consumers do.
    """
    run = database_sync_to_async(fn) if getattr(context, "consumer", None) is not None else sync_to_async(fn)
    try:
        return await run(context, *args, **kwargs)
    except REFUSALS as exc:
        raise api_error(exc) from exc
