"""One error shape for the whole API: ``{"error": {"code": "...", "message": "a sentence"}}``."""

from __future__ import annotations

from typing import Any

from django.http import Http404, JsonResponse
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from media_app.uploads import UploadRefused

# Refusal code -> HTTP status. The services speak in codes; only the API knows HTTP.
STATUS_FOR_CODE: dict[str, int] = {
    "invalid": 400,
    "size_mismatch": 400,
    "url_invalid": 403,
    "url_expired": 403,
    "not_found": 404,
    "offset_mismatch": 409,
    "not_uploaded": 409,
    "upload_finished": 409,
    "upload_failed": 409,
    "not_failed": 409,
    "source_missing": 409,
    "upload_expired": 410,
    "upload_gone": 410,
    "tus_version": 412,
    "too_large": 413,
    "quota_exceeded": 413,
    "unsupported_type": 415,
    "unsupported_media_type": 415,
    "upload_locked": 423,
    "too_many_uploads": 429,
    "rate_limited": 429,
}

_DRF_CODES: list[tuple[type[exceptions.APIException], str, str]] = [
    (exceptions.NotAuthenticated, "not_authenticated", "Log in or send an `Authorization: Token …` header."),
    (exceptions.AuthenticationFailed, "authentication_failed", "The credentials sent are not valid."),
    (exceptions.PermissionDenied, "permission_denied", "You may not do this."),
    (exceptions.NotFound, "not_found", "There is no such item."),
    (exceptions.MethodNotAllowed, "method_not_allowed", ""),
    (exceptions.UnsupportedMediaType, "unsupported_media_type", ""),
    (exceptions.NotAcceptable, "not_acceptable", "This API answers in JSON; accept application/json."),
    (exceptions.ParseError, "invalid", "The request body is not valid JSON."),
    (exceptions.ValidationError, "invalid", ""),
]


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def refused_response(exc: UploadRefused) -> Response:
    return Response(error_body(exc.code, exc.message), status=STATUS_FOR_CODE.get(exc.code, 400))


def json_error(code: str, message: str, status: int | None = None) -> JsonResponse:
    """The same shape from a plain Django view (the signed upload and download URLs)."""
    return JsonResponse(error_body(code, message), status=status or STATUS_FOR_CODE.get(code, 400))


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, UploadRefused):
        return refused_response(exc)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    response = drf_exception_handler(exc, context)
    if response is None or not isinstance(exc, exceptions.APIException):
        return response
    code, message, extra = "error", _plain(exc.detail), {}
    for cls, name, default in _DRF_CODES:
        if isinstance(exc, cls):
            # Our sentence replaces DRF's generic one, not a specific detail ("Invalid page.").
            generic = str(exc.detail) == str(cls.default_detail)
            code, message = name, (default if default and generic else message)
            break
    if isinstance(exc, exceptions.Throttled):
        wait = int(exc.wait or 1)
        code, message = (
            "rate_limited",
            f"Too many uploads started; try again in {wait} second{'' if wait == 1 else 's'}.",
        )
    elif isinstance(exc, exceptions.ValidationError):
        extra = {"fields": exc.detail}
        message = _validation_sentence(exc.detail)
    response.data = error_body(code, message, **extra)
    return response


def _plain(detail: Any) -> str:
    if isinstance(detail, list):
        return " ".join(_plain(d) for d in detail)
    if isinstance(detail, dict):
        return " ".join(f"{k}: {_plain(v)}" for k, v in detail.items())
    return str(detail)


def _validation_sentence(detail: Any) -> str:
    if isinstance(detail, dict):
        parts = [
            f"{field}: {_plain(errors)}" if field != "non_field_errors" else _plain(errors)
            for field, errors in detail.items()
        ]
        return "Some fields are not valid (" + "; ".join(parts) + ")."
    return _plain(detail)
