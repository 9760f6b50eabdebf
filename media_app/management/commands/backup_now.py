"""Write today's backup now, as the daily job does (e.g. before an upgrade)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from media_app.ops import backup_write


class Command(BaseCommand):
    help = "Write today's backup file (media items, outputs, history, manifest) and print its path."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dir", type=Path, default=None, help="write here instead of BACKUP_DIR")

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(str(backup_write(directory=options["dir"])))
