"""ASGI entry point: HTTP to Django, websockets to Channels consumers.

A websocket's session cookie counts only when its ``Origin`` is one of our hosts; a client with a
token needs no ``Origin`` (see ``media_app.consumers.SessionForOwnPages``).
"""

from __future__ import annotations

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
# Django must be set up before the routing (and its consumers' models) is imported.
django.setup(set_prefix=False)

from media_app.api.tus_stream import StreamingBodyASGIHandler  # noqa: E402

# Django's handler, except that a tus chunk streams into storage instead of a spool file first.
django_asgi_app = StreamingBodyASGIHandler()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from media_app.consumers import SessionForOwnPages  # noqa: E402
from media_app.graphql.schema import schema  # noqa: E402
from media_app.graphql.views import MediaGraphQLWSConsumer  # noqa: E402
from media_app.routing import websocket_urlpatterns  # noqa: E402
from media_app.whip import lifespan as whip_lifespan  # noqa: E402

# GraphQL subscriptions (graphql-transport-ws) share the origin check and the authentication.
websocket_routes = [path("graphql/", MediaGraphQLWSConsumer.as_asgi(schema=schema)), *websocket_urlpatterns]

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": SessionForOwnPages(URLRouter(websocket_routes)),
        # At shutdown, live WHIP sessions end and their recordings are stored (media_app.whip).
        "lifespan": whip_lifespan,
    }
)
