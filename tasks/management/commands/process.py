"""``manage.py process FILE…``: run the real chain in-process on local files, no Redis needed."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

EXIT_FAILED, EXIT_USAGE = 1, 2


class Command(BaseCommand):
    help = "Process local media files through the full pipeline, in this process, and report the outputs."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("paths", nargs="+", metavar="PATH", help="media files to process")
        parser.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
        parser.add_argument("--owner", default="cli", help="user that owns the created items (default: cli)")

    def handle(self, *args: Any, **options: Any) -> None:
        paths = [Path(p) for p in options["paths"]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            self.stderr.write(f"not a file: {', '.join(missing)}")
            sys.exit(EXIT_USAGE)
        if options["verbosity"] < 2:
            # Stage logs are for workers; here the summary (with each error) is the output.
            logging.getLogger().setLevel(logging.CRITICAL)
        self._embedded_mode()
        owner, _ = get_user_model().objects.get_or_create(username=options["owner"])

        from media_app import lifecycle
        from media_app.models import MediaStatus
        from media_app.services import media_item_create, media_item_store_source
        from tasks.stages import process

        failed = False
        for path in paths:
            started = time.monotonic()
            item = media_item_create(owner=owner, original_name=path.name, size=path.stat().st_size)
            with open(path, "rb") as fh:
                media_item_store_source(item=item, fileobj=fh)
            lifecycle.upload_finished(item_id=item.pk)
            task_id = lifecycle.queued(item_id=item.pk, send=False)
            process.apply(args=[str(item.pk)], task_id=task_id)
            item.refresh_from_db()
            failed |= item.status != MediaStatus.COMPLETED
            report = _report(path, item, time.monotonic() - started)
            if options["json"]:
                self.stdout.write(json.dumps(report))
            else:
                self.stdout.write(_human(report))
        sys.exit(EXIT_FAILED if failed else 0)

    def _embedded_mode(self) -> None:
        """Tasks run eagerly here and status goes to an in-memory layer: no broker, no Redis."""
        from config.celery import app

        app.conf.task_always_eager = True
        app.conf.task_eager_propagates = False
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
        executor = MigrationExecutor(connection)
        if executor.migration_plan(executor.loader.graph.leaf_nodes()):
            call_command("migrate", verbosity=0, interactive=False)


def _report(path: Path, item: Any, seconds: float) -> dict[str, Any]:
    from media_app.selectors import rendition_local_path, rendition_payload

    outputs = []
    for rendition in item.renditions.all():
        out = rendition_payload(rendition)
        out["path"] = rendition_local_path(rendition)
        outputs.append(out)
    return {
        "input": str(path),
        "id": str(item.pk),
        "kind": item.kind,
        "status": item.status,
        "error": {"code": item.error_code, "message": item.error_message} if item.error_code else None,
        "outputs": outputs,
        "timings": item.timings,
        "seconds": round(seconds, 3),
    }


def _human(report: dict[str, Any]) -> str:
    lines = [f"{report['input']}: {report['status']} ({report['kind'] or 'unknown'}, {report['seconds']:.2f} s)"]
    if report["error"]:
        lines.append(f"  error {report['error']['code']}: {report['error']['message']}")
    segments = [o for o in report["outputs"] if o["role"] == "segment"]
    for out in report["outputs"]:
        if out["role"] == "segment":
            continue
        dims = f" {out['width']}x{out['height']}" if out["width"] else ""
        dur = f" {out['duration']:.2f}s" if out["duration"] else ""
        lines.append(f"  {out['role']:<11} {out['codec'] or '-':<9}{dims}{dur} {out['bytes']:>10} B  {out['path']}")
    if segments:
        total = sum(o["bytes"] for o in segments)
        lines.append(f"  segments    {len(segments)} files, {total} B")
    if report["timings"]:
        lines.append("  stages      " + ", ".join(f"{k} {v:.2f}s" for k, v in report["timings"].items()))
    return "\n".join(lines)
