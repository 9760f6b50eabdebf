"""Write the GraphQL schema to ``schema.graphql``: ``manage.py print_graphql_schema`` (``--check`` to verify).

The file is the client contract in the repository; a test fails when the code drifts from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from media_app.graphql.schema import schema_path, schema_sdl


class Command(BaseCommand):
    help = "Print the GraphQL schema (SDL) to schema.graphql at the repository root."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--output", type=Path, default=None, help="Write here instead (`-` for stdout).")
        parser.add_argument("--check", action="store_true", help="Write nothing; fail if the file is out of date.")

    def handle(self, *args: Any, output: Path | None, check: bool, **options: Any) -> None:
        sdl = schema_sdl()
        if str(output) == "-":
            self.stdout.write(sdl, ending="")
            return
        path = output or schema_path()
        if check:
            if not path.exists() or path.read_text() != sdl:
                raise CommandError(f"{path} is out of date: run `manage.py print_graphql_schema`.")
            self.stdout.write(f"{path} is up to date.")
            return
        path.write_text(sdl)
        self.stdout.write(f"Wrote {path}.")
