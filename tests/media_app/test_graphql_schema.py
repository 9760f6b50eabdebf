"""``schema.graphql`` is the client contract: it must match the code, and hold what the issue names."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command
from graphql import GraphQLObjectType, build_schema

from media_app.graphql.schema import schema_path, schema_sdl


def test_the_committed_schema_is_the_codes_schema():
    assert schema_path().read_text() == schema_sdl(), "schema.graphql is stale: run `manage.py print_graphql_schema`"


def test_the_command_writes_the_file_and_its_check_fails_on_drift(tmp_path):
    path = tmp_path / "schema.graphql"
    path.write_text("type Query { old: Int }\n")
    with pytest.raises(CommandError, match="out of date"):
        call_command("print_graphql_schema", "--check", "--output", str(path))
    call_command("print_graphql_schema", "--output", str(path))
    assert path.read_text() == schema_sdl()
    call_command("print_graphql_schema", "--check", "--output", str(path))


def fields(schema, name: str) -> set[str]:
    kind = schema.get_type(name)
    assert isinstance(kind, GraphQLObjectType), name
    return set(kind.fields)


def test_the_contract_of_the_issue_is_in_the_schema():
    printed = build_schema(schema_path().read_text())
    assert {
        "id", "fileName", "kind", "processingStatus", "stage", "progress", "error", "attempts", "outputs",
        "createdAt", "updatedAt", "startedAt", "finishedAt",
    } <= fields(printed, "MediaItem")  # fmt: skip
    assert fields(printed, "MediaError") == {"code", "message"}
    assert {"kind", "url", "contentType", "codec", "width", "height", "duration", "bytes"} <= fields(
        printed, "MediaOutput"
    )
    assert {"item", "uploadUrl", "expiresAt", "tusUrl"} <= fields(printed, "CreateMediaUploadPayload")
    mutation = printed.mutation_type
    assert mutation is not None
    assert set(mutation.fields["createMediaUpload"].args) == {"fileName", "size", "contentType"}
    for name in ("completeMediaUpload", "retryMedia", "cancelMedia"):
        assert set(mutation.fields[name].args) == {"mediaId"}
    query = printed.query_type
    assert query is not None
    assert set(query.fields["mediaItem"].args) == {"id"}
    assert set(query.fields["mediaItems"].args) == {"status", "kind", "first", "after"}
    assert printed.subscription_type is not None
    assert set(printed.subscription_type.fields["mediaStatus"].args) == {"mediaId"}
    assert list(printed.get_type("ProcessingStatus").values) == ["Pending", "Processing", "Completed", "Failed"]
