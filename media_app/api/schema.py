"""The OpenAPI schema's parts that drf-spectacular cannot infer: every error answer as it really
is, response headers, the endpoints that are not DRF views (presigned PUT, downloads, DASH) or
use methods it leaves out (tus HEAD and OPTIONS), and the links between operations.

The schema is a contract: a client generated from it must work, and a request it refuses must
be refused by the server (tests/media_app/test_api_contract.py fuzzes one against the other).
"""

from __future__ import annotations

import copy
from typing import Any

from django.conf import settings
from drf_spectacular.utils import OpenApiResponse

from media_app.api.serializers import ErrorOutput

TUS_EXTENSIONS = "creation,creation-with-upload,termination,expiration"
# tus 1.0 Upload-Metadata: comma-separated pairs of a key (visible ASCII, no comma) and, after a
# space, its value in base64 (which may be left out). The server parses exactly this grammar.
_B64 = r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"
_PAIR = rf"[!-+\--~]+(?: {_B64})?"
UPLOAD_METADATA_PATTERN = rf"^(?:{_PAIR}(?:[ \t]*,[ \t]*{_PAIR})*)?$"
ERROR_REF = {"$ref": "#/components/schemas/ErrorOutput"}
JSON_ERROR = {"application/json": {"schema": ERROR_REF}}

# What each status means across the API; an operation may say more (``error_responses(409=...)``).
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "`invalid`: the request does not match this schema; `fields` says what is wrong with each field.",
    401: "`not_authenticated`: no credentials; `authentication_failed`: a token that is not valid.",
    403: "`permission_denied`: a browser session without its CSRF token (token clients need none).",
    404: "`not_found`: no such item, or another user's: the two are not told apart.",
    406: "`not_acceptable`: the `Accept` header rules out JSON.",
    409: "The item's state does not allow this now.",
    410: "`upload_gone`: the upload failed or was refused; `upload_expired`: it stayed idle too long.",
    412: "`tus_version`: send `Tus-Resumable: 1.0.0`.",
    413: "`too_large`: more than the largest file accepted; `quota_exceeded`: over your storage quota.",
    415: "`unsupported_media_type`: the body is not sent with the content type this operation takes.",
    416: "`range_not_satisfiable`: the range starts past the end of the file.",
    423: "`upload_locked`: another request is writing to this upload; try again shortly.",
    429: "`rate_limited`: too many uploads started in a short time (see `Retry-After`); "
    "`too_many_uploads`: finish or delete an upload in progress first.",
}
# Every DRF view: authentication, and content negotiation of the answer.
COMMON = (401, 406)
# Every DRF view that changes something: also the session's CSRF check.
COMMON_WRITE = (401, 403, 406)


def error_responses(*statuses: int, **descriptions: str) -> dict[int, OpenApiResponse]:
    """``extend_schema(responses=…)`` entries for error answers, all ``{"error": {...}}``."""
    extra = {int(k.lstrip("_")): v for k, v in descriptions.items()}
    return {
        status: OpenApiResponse(ErrorOutput, description=extra.get(status, ERROR_DESCRIPTIONS[status]))
        for status in sorted({*statuses, *extra})
    }


# --- headers ---------------------------------------------------------------------------------


def _header(schema: dict[str, Any], description: str, *, required: bool = True) -> dict[str, Any]:
    return {"schema": schema, "description": description, "required": required}


INT = {"type": "integer", "minimum": 0}
TUS_RESUMABLE_IN = {
    "name": "Tus-Resumable",
    "in": "header",
    "required": True,
    "schema": {"type": "string", "enum": ["1.0.0"]},
    "description": "The tus version the client speaks.",
}
TUS_RESUMABLE_OUT = {"Tus-Resumable": _header({"type": "string", "enum": ["1.0.0"]}, "On every tus answer.")}
RETRY_AFTER = {
    "Retry-After": _header(INT, "Seconds to wait before the next create (with `rate_limited`).", required=False)
}
WWW_AUTHENTICATE = {"WWW-Authenticate": _header({"type": "string"}, "`Token`: how to authenticate.")}
UPLOAD_EXPIRES = _header({"type": "string"}, "HTTP date when the idle upload will be removed.", required=False)
RANGE_HEADERS = {
    "Content-Length": _header(INT, "Bytes in this answer."),
    "Accept-Ranges": _header({"type": "string", "enum": ["bytes"]}, "One `Range: bytes=…` per request."),
    "Content-Range": _header({"type": "string"}, "With 206: `bytes first-last/size`.", required=False),
}


def _error(status: int, description: str | None = None, *, head: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description or ERROR_DESCRIPTIONS[status]}
    if not head:
        answer["content"] = copy.deepcopy(JSON_ERROR)
    return answer


# --- endpoints that are not DRF views, or methods drf-spectacular leaves out ------------------

TOKEN_PARAM = {
    "name": "token",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "The signed grant from the URL the API gave; it expires and names one object.",
}
SIGNED_URL_REFUSED = "`url_invalid`: altered or not issued by us; `url_expired`: ask for a new URL."
RANGE_PARAM = {
    "name": "Range",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "One `bytes=first-last` range; several ranges, or another unit, get the whole file.",
}
ITEM_ID_PARAM = {"name": "item_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}


def _file_get(operation_id: str, summary: str, *, head: bool, params: list[dict[str, Any]]) -> dict[str, Any]:
    served = {
        "description": "The file (or its headers, for HEAD).",
        "headers": copy.deepcopy(RANGE_HEADERS),
    }
    partial = {"description": "The range asked for.", "headers": copy.deepcopy(RANGE_HEADERS)}
    if not head:
        served["content"] = {"*/*": {"schema": {"type": "string", "format": "binary"}}}
        partial["content"] = {"*/*": {"schema": {"type": "string", "format": "binary"}}}
    return {
        "operationId": operation_id,
        "summary": summary,
        "tags": ["files"],
        "security": [{}],
        "parameters": [*params, RANGE_PARAM],
        "responses": {
            "200": served,
            "206": partial,
            "403": _error(403, SIGNED_URL_REFUSED, head=head),
            "404": _error(404, "`not_found`: the file no longer exists.", head=head),
            "416": {
                **_error(416, head=head),
                "headers": {"Content-Range": _header({"type": "string"}, "bytes */size")},
            },
        },
    }


def _file_paths() -> dict[str, Any]:
    name_param = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
        "description": "A file of the DASH folder: the manifest, or a segment it names.",
    }
    return {
        "/api/files/{token}": {
            "get": _file_get("file_get", "Download one output", head=False, params=[TOKEN_PARAM]),
            "head": _file_get("file_head", "Headers of one output", head=True, params=[TOKEN_PARAM]),
        },
        "/api/dash/{token}/{name}": {
            "get": _file_get("dash_get", "A DASH manifest or segment", head=False, params=[TOKEN_PARAM, name_param]),
            "head": _file_get("dash_head", "Its headers", head=True, params=[TOKEN_PARAM, name_param]),
        },
    }


def _upload_put_path() -> dict[str, Any]:
    stored = {
        "type": "object",
        "required": ["id", "size", "stored"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "size": {"type": "integer"},
            "stored": {"type": "boolean", "enum": [True]},
        },
    }
    return {
        "/api/uploads/{token}": {
            "put": {
                "operationId": "upload_put",
                "parameters": [TOKEN_PARAM],
                "summary": "Send a file's bytes to its presigned URL",
                "description": (
                    "The URL from `upload.url` of the create answer is the credential: send no other. The body "
                    "is the whole file, exactly `size` bytes. With S3 storage `upload.url` is S3's own "
                    "presigned URL instead, which answers as S3 does. Then `POST …/complete`."
                ),
                "tags": ["uploads"],
                "security": [{}],
                "requestBody": {
                    "required": True,
                    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                },
                "responses": {
                    "200": {
                        "description": "Stored.",
                        "content": {"application/json": {"schema": stored}},
                        "links": {
                            "Complete": {
                                "operationId": "media_complete",
                                "parameters": {"item_id": "$response.body#/id"},
                            }
                        },
                    },
                    "400": _error(400, "`size_mismatch`: the body is not the size declared at create."),
                    "403": _error(403, SIGNED_URL_REFUSED),
                    "404": _error(404, "`not_found`: the item was deleted."),
                    "409": _error(409, "`upload_finished`: the bytes are in already; `upload_failed`."),
                    "410": _error(410, "`upload_expired`: the upload stayed idle too long; create it again."),
                    "413": _error(413, "`too_large`: more than the largest file accepted."),
                    "415": _error(415, "`unsupported_type`: the content is not a type we accept (sniffed)."),
                    "423": _error(423),
                },
            },
        }
    }


def _tus_paths() -> dict[str, Any]:
    chunk_body = {
        "required": False,
        "content": {"application/offset+octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
    options = {
        "security": [{}],
        "tags": ["tus"],
        "summary": "tus discovery: version, extensions, largest size",
        "responses": {
            "204": {
                "description": "What this server supports.",
                "headers": {
                    **TUS_RESUMABLE_OUT,
                    "Tus-Version": _header({"type": "string"}, "`1.0.0`"),
                    "Tus-Extension": _header(
                        {"type": "string"}, "`creation,creation-with-upload,termination,expiration`"
                    ),
                    "Tus-Max-Size": _header(INT, "The largest upload accepted, in bytes."),
                },
            }
        },
    }
    auth = [{"tokenAuth": []}, {"cookieAuth": []}]
    offset_out = {"Upload-Offset": _header(INT, "Bytes received so far."), "Upload-Expires": UPLOAD_EXPIRES}
    return {
        "/api/tus/": {
            "options": {**copy.deepcopy(options), "operationId": "tus_options"},
            "post": {
                "operationId": "tus_create",
                "summary": "tus creation (and creation-with-upload)",
                "description": (
                    "Creates an item, as `POST /api/media/` does, under the same limits. `Upload-Metadata` may "
                    "carry `filename` and `filetype` (base64). A body sent as `application/offset+octet-stream` "
                    "is the first chunk. tus 1.0: https://tus.io/protocols/resumable-upload"
                ),
                "tags": ["tus"],
                "security": auth,
                "parameters": [
                    TUS_RESUMABLE_IN,
                    {
                        "name": "Upload-Length",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1, "maximum": settings.UPLOAD_MAX_BYTES},
                        "description": "The file's exact size in bytes (Upload-Defer-Length is not supported).",
                    },
                    {
                        "name": "Upload-Metadata",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": UPLOAD_METADATA_PATTERN},
                        "description": "`key base64value` pairs separated by commas; `filename`, `filetype` are read.",
                    },
                ],
                "requestBody": chunk_body,
                "responses": {
                    "201": {
                        "description": "Created; send the bytes to `Location`.",
                        "headers": {
                            **TUS_RESUMABLE_OUT,
                            "Location": _header({"type": "string", "format": "uri"}, "The upload's tus URL."),
                            "Upload-Expires": UPLOAD_EXPIRES,
                            "Upload-Offset": _header(INT, "With a first chunk: bytes received.", required=False),
                        },
                        "links": {
                            "TusHead": {
                                "operationId": "tus_head",
                                "parameters": {"item_id": "$response.header.Location#regex:/api/tus/([^/?#]+)$"},
                            },
                            "TusPatch": {
                                "operationId": "tus_patch",
                                "parameters": {
                                    "item_id": "$response.header.Location#regex:/api/tus/([^/?#]+)$",
                                    "Upload-Offset": "0",
                                },
                            },
                            "TusDelete": {
                                "operationId": "tus_delete",
                                "parameters": {"item_id": "$response.header.Location#regex:/api/tus/([^/?#]+)$"},
                            },
                            "GetItem": {
                                "operationId": "media_get",
                                "parameters": {"item_id": "$response.header.Location#regex:/api/tus/([^/?#]+)$"},
                            },
                        },
                    },
                    **_tus_errors(400, 401, 403, 409, 412, 413, 415, 423, 429, header_429=True),
                },
            },
        },
        "/api/tus/{item_id}": {
            "options": {
                **copy.deepcopy(options),
                "operationId": "tus_upload_options",
                "parameters": [ITEM_ID_PARAM],
                "responses": {
                    **copy.deepcopy(options["responses"]),
                    **_tus_errors(404, descriptions={404: "`not_found`: the id is not an upload id at all."}),
                },
            },
            "head": {
                "operationId": "tus_head",
                "summary": "Where to resume: the upload's offset",
                "description": "A HEAD that finds every byte received but not yet stored finishes the upload.",
                "tags": ["tus"],
                "security": auth,
                "parameters": [ITEM_ID_PARAM, TUS_RESUMABLE_IN],
                "responses": {
                    "200": {
                        "description": "The upload's state (no body).",
                        "headers": {
                            **TUS_RESUMABLE_OUT,
                            **offset_out,
                            "Upload-Length": _header(INT, "The file's size."),
                            "Upload-Metadata": _header({"type": "string"}, "`filename`, `filetype`.", required=False),
                            "Cache-Control": _header({"type": "string", "enum": ["no-store"]}, "Never cached."),
                        },
                    },
                    **_tus_errors(400, 401, 404, 409, 410, 412, 415, 423, head=True),
                },
            },
            "patch": {
                "operationId": "tus_patch",
                "summary": "Append a chunk at the upload's offset",
                "description": "The chunk that brings the last byte completes the item (as `…/complete` does).",
                "tags": ["tus"],
                "security": auth,
                "parameters": [
                    ITEM_ID_PARAM,
                    TUS_RESUMABLE_IN,
                    {
                        "name": "Upload-Offset",
                        "in": "header",
                        "required": True,
                        "schema": INT,
                        "description": "Must equal the server's offset (HEAD tells it).",
                    },
                ],
                "requestBody": {**chunk_body, "required": True},
                "responses": {
                    "204": {"description": "Appended.", "headers": {**TUS_RESUMABLE_OUT, **offset_out}},
                    **_tus_errors(400, 401, 403, 404, 409, 410, 412, 413, 415, 423),
                },
            },
            "delete": {
                "operationId": "tus_delete",
                "summary": "tus termination: remove the upload and its item",
                "tags": ["tus"],
                "security": auth,
                "parameters": [ITEM_ID_PARAM, TUS_RESUMABLE_IN],
                "responses": {
                    "204": {"description": "Removed.", "headers": copy.deepcopy(TUS_RESUMABLE_OUT)},
                    **_tus_errors(401, 403, 404, 412, 423),
                },
            },
        },
    }


TUS_DESCRIPTIONS = {
    400: "`invalid`: a tus header is missing or malformed; `size_mismatch`.",
    409: "`offset_mismatch`: resume from the server's offset; `upload_finished`; `upload_failed`.",
    413: "`too_large`: more bytes than declared, or than accepted; `quota_exceeded`.",
    415: "`unsupported_media_type`: send chunks as `application/offset+octet-stream`; "
    "`unsupported_type`: the content is not a type we accept (sniffed from the first bytes).",
}


def _tus_errors(
    *statuses: int, head: bool = False, header_429: bool = False, descriptions: dict[int, str] | None = None
) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    for status in statuses:
        answer = _error(status, (descriptions or {}).get(status) or TUS_DESCRIPTIONS.get(status), head=head)
        answer["headers"] = copy.deepcopy(TUS_RESUMABLE_OUT)
        if status == 401:
            answer["headers"].update(WWW_AUTHENTICATE)
        if status == 429 and header_429:
            answer["headers"].update(RETRY_AFTER)
        answers[str(status)] = answer
    return answers


# --- links between the JSON operations (schemathesis follows them; so can a reader) ------------


def _item_links(source: str) -> dict[str, Any]:
    item = {"item_id": source}
    return {
        "GetItem": {"operationId": "media_get", "parameters": item},
        "DeleteItem": {"operationId": "media_delete", "parameters": item},
        "CompleteItem": {"operationId": "media_complete", "parameters": item},
        "RetryItem": {"operationId": "media_retry", "parameters": item},
    }


def postprocess(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular POSTPROCESSING_HOOKS entry: add what the views cannot say themselves."""
    paths = result.setdefault("paths", {})
    paths.update(_upload_put_path())
    paths.update(_file_paths())
    paths.update(_tus_paths())

    for item in paths.values():
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            for status, answer in operation["responses"].items():
                headers = answer.setdefault("headers", {})
                if status == "401":
                    headers.update(copy.deepcopy(WWW_AUTHENTICATE))
                if status == "429":
                    headers.update(copy.deepcopy(RETRY_AFTER))
                if not headers:
                    del answer["headers"]

    # The limit is the operator's (UPLOAD_MAX_BYTES), read when the schema is made. Over it: 413.
    result["components"]["schemas"]["MediaCreateInput"]["properties"]["size"]["maximum"] = settings.UPLOAD_MAX_BYTES
    created = paths["/api/media/"]["post"]["responses"]["201"]
    created["headers"] = {"Location": _header({"type": "string", "format": "uri"}, "The new item's URL.")}
    created["links"] = {
        **_item_links("$response.body#/id"),
        "PutBytes": {
            "operationId": "upload_put",
            "parameters": {"token": "$response.body#/upload/url#regex:/api/uploads/([^/?#]+)$"},
        },
        "TusHead": {"operationId": "tus_head", "parameters": {"item_id": "$response.body#/id"}},
        "TusDelete": {"operationId": "tus_delete", "parameters": {"item_id": "$response.body#/id"}},
    }
    for path, status in (("/api/media/{item_id}/complete", "202"), ("/api/media/{item_id}/retry", "202")):
        paths[path]["post"]["responses"][status]["links"] = _item_links("$response.body#/id")
    paths["/api/media/{item_id}"]["get"]["responses"]["200"]["links"] = _item_links("$response.body#/id")
    return result
