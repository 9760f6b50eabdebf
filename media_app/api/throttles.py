"""Rate limit on creates, counted in Redis so every web process shares one count per user."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.cache import caches
from rest_framework.throttling import UserRateThrottle


class UploadCreateThrottle(UserRateThrottle):
    scope = "upload_create"

    @property
    def cache(self) -> Any:  # type: ignore[override]
        return caches["uploads"]

    def get_rate(self) -> str:
        # Read on every request, not frozen at import, so an operator's (or a test's) setting holds.
        return str(settings.UPLOAD_CREATE_RATE)
