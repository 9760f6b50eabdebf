"""Stage directories: where a stage's files live between tasks, and why a rerun can skip.

Each stage writes into a fresh temporary directory and renames it to
``WORK_ROOT/<item>/<stage>`` only when done, with its ``result.json`` inside. The rename is
atomic, so a stage directory either is complete or does not exist: a redelivered or retried
chain skips every stage whose directory exists.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings

from pipelines.results import from_json, to_json

T = TypeVar("T")
RESULT_FILE = "result.json"


def item_dir(item_id: Any) -> Path:
    return Path(settings.WORK_ROOT) / str(item_id)


def stage_dir(item_id: Any, stage: str) -> Path:
    return item_dir(item_id) / stage


def stage_done(item_id: Any, stage: str) -> bool:
    return (stage_dir(item_id, stage) / RESULT_FILE).exists()


def new_tmp_dir(item_id: Any, stage: str) -> Path:
    path = item_dir(item_id) / f".{stage}.tmp-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def commit_stage(item_id: Any, stage: str, tmp: Path, result: Any) -> None:
    (tmp / RESULT_FILE).write_text(json.dumps(to_json(result), indent=1))
    final = stage_dir(item_id, stage)
    try:
        os.rename(tmp, final)
    except OSError:
        # Another delivery of the same stage finished first; its result stands.
        if not stage_done(item_id, stage):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def load_result(item_id: Any, stage: str, cls: type[T]) -> T:
    data = json.loads((stage_dir(item_id, stage) / RESULT_FILE).read_text())
    return from_json(cls, data)


def clear(item_id: Any) -> None:
    """Remove the item's work files on this host."""
    shutil.rmtree(item_dir(item_id), ignore_errors=True)


def clear_tmp(item_id: Any) -> None:
    base = item_dir(item_id)
    if base.exists():
        for child in base.iterdir():
            if child.name.startswith(".") and ".tmp-" in child.name:
                shutil.rmtree(child, ignore_errors=True)
