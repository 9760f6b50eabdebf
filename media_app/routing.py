from django.urls import path  # noqa: F401

# Websocket consumers (live status) are added by the live-status work.
websocket_urlpatterns: list = []
