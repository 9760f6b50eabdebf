"""The upload page, its login, and the health check.

The page is static HTML plus one script: everything it shows comes from the API and the
websocket. The server's limits go into the page as JSON, so the browser refuses a file the
server would refuse before sending a byte of it.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.templatetags.static import static
from django.urls import reverse, reverse_lazy
from django.views.decorators.csrf import ensure_csrf_cookie

from pipelines.errors import InvalidInput, UnsupportedCodec
from pipelines.sniff import (
    ALIASES_BY_MIME,
    EXTENSIONS_BY_MIME,
    FORMATS,
    REFUSED_BRANDS,
    REFUSED_SIGNATURES,
    sniff_bytes,
)

# File name endings a browser may report for each accepted type (a browser's own guess of the
# type is often empty, e.g. for .mkv or .heic), and other names browsers give the same types:
# from the sniffer's table of formats. Only a first filter: the server sniffs the bytes.
EXTENSIONS_FOR_TYPE: dict[str, tuple[str, ...]] = EXTENSIONS_BY_MIME
TYPE_ALIASES: dict[str, tuple[str, ...]] = ALIASES_BY_MIME
KIND_OF_TYPE: dict[str, str] = {f.mime: f.kind for f in FORMATS}
_EXT = EXTENSIONS_FOR_TYPE

LOGIN_URL = reverse_lazy("login")
# Bumped when page.js or page.css change, so browsers do not keep an old copy.
ASSET_VERSION = "7"

# ffmpeg.wasm in the page (scripts/fetch_wasm.py installs it; frontend/ffmpeg pins the versions).
WASM_FFMPEG = "media_app/wasm/ffmpeg-0.12.15/dist/esm/index.js"
WASM_CORE = "media_app/wasm/core-0.12.10/dist/esm/ffmpeg-core"
WASM_WORKERS = 2  # probes and cuts at once; each worker holds its own core (~60 MB)


def refused_heads() -> list[dict[str, Any]]:
    """The magic numbers the sniffer refuses by name, each with the sentence it gives (asked of
    the sniffer itself): the page refuses such a file, when ffmpeg.wasm finds no media in it,
    with the server's words rather than the general one."""
    heads = []
    for magic, _name in REFUSED_SIGNATURES:
        heads.append({"at": 0, "hex": magic.hex(), "sentence": _sentence(magic + bytes(64))})
    for brand in REFUSED_BRANDS:
        box = b"\x00\x00\x00\x18ftyp" + brand + bytes(64)
        heads.append({"at": 4, "hex": (b"ftyp" + brand).hex(), "sentence": _sentence(box)})
    return heads


def _sentence(head: bytes) -> str:
    try:
        sniff_bytes(head)
    except (InvalidInput, UnsupportedCodec) as exc:
        return exc.message
    raise AssertionError(f"the sniffer accepted {head[:16]!r}")


def not_media_sentence() -> str:
    """The sentence the server's sniffer gives bytes that are no media, for the page to show the
    same one when the browser finds a picked file is not media (so the two never drift apart)."""
    return _sentence(b"This is plain text, not media.\n")


def page_config(request: HttpRequest) -> dict[str, Any]:
    """What the page's script needs: the server's limits and where everything is."""
    allowed = list(settings.UPLOAD_ALLOWED_CONTENT_TYPES)
    types = sorted({*allowed, *(alias for t in allowed for alias in TYPE_ALIASES.get(t, ()))})
    extensions = sorted({ext for t in allowed for ext in EXTENSIONS_FOR_TYPE.get(t, ())})
    return {
        "limits": {
            "max_bytes": settings.UPLOAD_MAX_BYTES,
            "allowed_types": types,
            "allowed_extensions": extensions,
            # For the sentence that lists what is accepted: endings grouped by kind.
            "extensions_by_kind": {
                kind: sorted(
                    {e for t in allowed if KIND_OF_TYPE.get(t) == kind for e in EXTENSIONS_FOR_TYPE.get(t, ())}
                )
                for kind in ("video", "audio", "image")
            },
            "max_unfinished": settings.UPLOAD_MAX_UNFINISHED,
        },
        "chunk_bytes": settings.UPLOAD_PAGE_CHUNK_BYTES,
        "urls": {
            "tus": reverse("api:tus"),
            "media": reverse("api:media-list"),
            "ws": "/ws/media/",
        },
        "user": request.user.get_username(),
        "wasm": {
            "ffmpeg": static(WASM_FFMPEG),
            "core": static(f"{WASM_CORE}.js"),
            "wasm": static(f"{WASM_CORE}.wasm"),
            "workers": WASM_WORKERS,
            "not_media": not_media_sentence(),
            "refused_heads": refused_heads(),
        },
    }


@ensure_csrf_cookie
@login_required(login_url=LOGIN_URL)
def home(request: HttpRequest) -> HttpResponse:
    config = page_config(request)
    accept = ",".join([*config["limits"]["allowed_types"], *config["limits"]["allowed_extensions"]])
    context = {"page_config": config, "accept": accept, "asset_version": ASSET_VERSION}
    return render(request, "media_app/home.html", context)


login = auth_views.LoginView.as_view(
    template_name="media_app/login.html",
    redirect_authenticated_user=True,
    next_page="home",
    extra_context={"asset_version": ASSET_VERSION},
)
logout = auth_views.LogoutView.as_view(next_page=LOGIN_URL)


def healthz(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"ok": True})
