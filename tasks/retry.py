"""Which errors a retry can fix, and how a failure is told to a person.

Retry only what is outside the file: timeouts, a crashed helper process, the database or broker
blinking. Bad input, unsupported codecs and limits fail at once: retrying cannot change them.
"""

from __future__ import annotations

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from django.db import InterfaceError, OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from media_app.lifecycle import ErrorReport
from pipelines.errors import MediaError, retryable_errors

# The pipeline's own errors say whether a retry can help (``MediaError.retryable``); the rest are
# the infrastructure blinking.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    *retryable_errors(),
    SoftTimeLimitExceeded,
    OperationalError,
    InterfaceError,
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
)


def classify(exc: BaseException) -> ErrorReport:
    """Turn any exception into the code and sentence the item shows."""
    if isinstance(exc, MediaError):
        return ErrorReport(exc.code, exc.message, exc.detail)
    if isinstance(exc, (SoftTimeLimitExceeded, TimeLimitExceeded)):
        return ErrorReport("timeout", "Processing took longer than allowed.", repr(exc))
    return ErrorReport(
        "internal", "Something went wrong on our side while processing this file.", f"{type(exc).__name__}: {exc}"
    )
