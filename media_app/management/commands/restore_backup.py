"""Restore a daily backup (``media.maintenance.backup``) into a database with no media items yet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from media_app.ops import backup_restore


class Command(BaseCommand):
    help = (
        "Load a backup file (items, outputs, history, owners) into an empty database: "
        "run `migrate` first, then `restore_backup FILE`."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path, help="a media-YYYY-MM-DD.json file from BACKUP_DIR")

    def handle(self, *args: Any, **options: Any) -> None:
        path: Path = options["file"]
        if not path.is_file():
            raise CommandError(f"{path}: no such file")
        try:
            counts = backup_restore(path=path)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"restored {counts['media_items']} items, {counts['renditions']} outputs, "
            f"{counts['status_events']} history rows, {counts['users']} new owners from {path}"
        )
        if counts["missing_files"]:
            self.stderr.write(
                f"warning: {counts['missing_files']} files of the manifest are not in storage; "
                "restore the storage (MEDIA_ROOT or the bucket) too"
            )
