"""WHIP (RFC 9725): publish a live camera or an encoder (OBS 30+) into a new upload.

``POST /api/whip/`` with an SDP offer (``Content-Type: application/sdp``) and the API token as
``Authorization: Bearer <token>`` (``Token <token>`` works too; the upload page sends its session
and CSRF token, as for every other call it makes) answers 201 with the SDP answer
and the session's URL, ``/api/whip/<item id>``; ``DELETE`` on it ends the session, whose
recording is then processed like any upload (``media_app.whip``). The errors are the API's
JSON shape. No trickle ICE: a PATCH is 405, as the RFC allows (the offer carries its candidates).
"""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.http import HttpResponse
from django.urls import reverse
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.parsers import BaseParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from media_app.api.errors import error_body
from media_app.api.schema import error_responses
from media_app.api.throttles import UploadCreateThrottle
from media_app.api.views import content_length, item_for_user
from media_app.uploads import UploadRefused
from media_app.whip import SDP_MAX_BYTES, WhipRefused, whip_session_start, whip_session_stop

SDP = "application/sdp"


class SdpParser(BaseParser):
    """The offer as text, at most SDP_MAX_BYTES (a session's CSRF check reads the body too)."""

    media_type = SDP

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> str:
        data = stream.read(SDP_MAX_BYTES + 1) if stream is not None else b""
        if len(data) > SDP_MAX_BYTES:
            raise UploadRefused("too_large", f"An SDP offer is at most {SDP_MAX_BYTES // 1024} KB.")
        try:
            return str(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise UploadRefused("invalid", "The SDP offer is not UTF-8 text.") from None


class BearerTokenAuthentication(TokenAuthentication):
    """The API's tokens as ``Authorization: Bearer …``, the header WHIP clients send."""

    keyword = "Bearer"


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """Its own name in the schema: drf-spectacular would call it ``tokenAuth`` like the Token
    scheme it subclasses, and warn (a ``check --deploy`` failure) about the clash."""

    target_class = BearerTokenAuthentication
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "The API token (as for `Token …`)."}


def _ice_links() -> list[str]:
    """RFC 9725 4.6: the ICE servers the client may use, as Link headers."""
    links = []
    for server in settings.WHIP_ICE_SERVERS:
        urls = server["urls"] if isinstance(server["urls"], list) else [server["urls"]]
        for url in urls:
            link = f'<{url}>; rel="ice-server"'
            if server.get("username"):
                link += f'; username="{server["username"]}"; credential="{server.get("credential", "")}"'
                link += '; credential-type="password"'
            links.append(link)
    return links


class _WhipView(APIView):
    # Bearer first: an anonymous call answers 401 with `WWW-Authenticate: Bearer`. The page's
    # session counts too (with its CSRF token), so the page never holds the long-lived API token.
    authentication_classes = [BearerTokenAuthentication, TokenAuthentication, SessionAuthentication]
    parser_classes = [SdpParser]

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # A WHIP client may send `Accept: application/sdp`: the answer is SDP, an error JSON.
        return super().perform_content_negotiation(request, force=True)


class WhipApi(_WhipView):
    def get_throttles(self) -> list[Any]:
        return [UploadCreateThrottle()] if self.request.method == "POST" else []

    @extend_schema(
        operation_id="whip_publish",
        summary="Publish live audio and video (WHIP, RFC 9725)",
        description=(
            "The body is the publisher's SDP offer (Opus audio; VP8 or H.264 video). Authenticate with "
            "`Authorization: Bearer <token>` (the API token; `Token <token>` works too). The answer is the SDP "
            "answer; `Location` is the session's URL, `/api/whip/<item id>`: DELETE it to stop. The recording is "
            "a new item, processed like an upload when the session ends (DELETE, a dropped connection, "
            "`WHIP_SILENCE_TIMEOUT_SECONDS` without media, or a limit: length, bitrate)."
        ),
        tags=["whip"],
        request={SDP: OpenApiTypes.STR},
        responses={
            (201, SDP): OpenApiResponse(OpenApiTypes.STR, description="The SDP answer."),
            **error_responses(
                401,
                403,
                413,
                _400="`invalid`: not an SDP offer, or one that publishes nothing; `unsupported_codec`: "
                "no Opus, VP8 or H.264 in it.",
                _415=f"`unsupported_media_type`: send the offer as `{SDP}`.",
                _429="`too_many_sessions`: end one of your live sessions first; `rate_limited`; `too_many_uploads`.",
            ),
        },
    )
    def post(self, request: Request) -> HttpResponse:
        if request.content_type.split(";")[0].strip().lower() != SDP:
            raise UploadRefused("unsupported_media_type", f"Send the SDP offer as {SDP}.")
        if (content_length(request._request) or 0) > SDP_MAX_BYTES:
            raise UploadRefused("too_large", f"An SDP offer is at most {SDP_MAX_BYTES // 1024} KB.")
        offer = request.data if isinstance(request.data, str) else ""
        started = time.monotonic()
        try:
            answer = whip_session_start(owner=request.user, offer=offer)
        except WhipRefused as exc:
            return Response(error_body(exc.code, exc.message), status=exc.status)
        response = HttpResponse(answer.sdp, status=status.HTTP_201_CREATED, content_type=SDP)
        response["Location"] = reverse("api:whip-session", args=[answer.item_id])
        response["ETag"] = f'"{answer.item_id}"'
        response["Server-Timing"] = f"answer;dur={(time.monotonic() - started) * 1000:.0f}"
        links = _ice_links()
        if links:
            response["Link"] = ", ".join(links)
        return response


class WhipSessionApi(_WhipView):
    @extend_schema(
        operation_id="whip_stop",
        summary="End a WHIP session",
        description="Ends the session; its recording is stored and queued for processing before this answers.",
        tags=["whip"],
        parameters=[OpenApiParameter("item_id", OpenApiTypes.UUID, OpenApiParameter.PATH)],
        responses={
            200: OpenApiResponse(description="Ended; the item is processing."),
            **error_responses(401, 403, _404="`not_found`: no such session (ended, or another user's)."),
        },
    )
    def delete(self, request: Request, item_id: str) -> Response:
        item = item_for_user(request, item_id)  # a stranger's session is 404, like their items
        if not whip_session_stop(item_id=item.pk):
            return Response(error_body("not_found", "This session has ended."), status=status.HTTP_404_NOT_FOUND)
        return Response(status=status.HTTP_200_OK)
