"""The schema: ``Query``, ``Mutation`` and ``Subscription``, printed to ``schema.graphql``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import strawberry
from django.conf import settings
from graphql import GraphQLError
from strawberry.schema.config import StrawberryConfig

from media_app.graphql.errors import MaskUnexpectedErrors, is_expected
from media_app.graphql.mutations import Mutation
from media_app.graphql.queries import Query
from media_app.graphql.subscription import Subscription
from media_app.graphql.types import SCALARS

logger = logging.getLogger("media_app.graphql")


class MediaSchema(strawberry.Schema):
    def process_errors(self, errors: list[GraphQLError], execution_context: Any = None) -> None:
        # A refusal (not_found, quota_exceeded, …) is an answer, not an incident: log only the rest.
        unexpected = [error for error in errors if not is_expected(error)]
        if unexpected:
            super().process_errors(unexpected, execution_context)


schema = MediaSchema(
    query=Query,
    mutation=Mutation,
    subscription=Subscription,
    extensions=[MaskUnexpectedErrors],
    config=StrawberryConfig(scalar_map=SCALARS),
)


def schema_path() -> Path:
    return Path(settings.BASE_DIR) / "schema.graphql"


def schema_sdl() -> str:
    """The schema as committed to ``schema.graphql``: SDL plus a final newline."""
    return schema.as_str().rstrip("\n") + "\n"
