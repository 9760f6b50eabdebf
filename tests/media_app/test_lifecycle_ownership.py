"""Only ``media_app/lifecycle.py`` writes an item's state: a review rule, checked on every run."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

from tests.env_plugin import ROOT

STATE_FIELDS = {
    "status",
    "stage",
    "progress",
    "attempts",
    "error_code",
    "error_message",
    "error_detail",
    "queued_at",
    "upload_finished_at",
    "waiting_since",
}
OWNER = ROOT / "media_app" / "lifecycle.py"
APP_DIRS = ("media_app", "tasks", "pipelines", "config")


def _writes(path: Path, tree: ast.Module | None = None) -> list[str]:
    """Places in ``path`` that assign a state field (``x.status = …``), pass one to ``update()``
    or ``create()``/``save(update_fields=…)``, or set one through ``setattr``. ``tree`` is the
    file already parsed (by ``_parse_all``), if it is."""
    found = []
    if tree is None:
        tree = _parse_all([path])[0]
    name_of_file = path.relative_to(ROOT)
    for node in ast.walk(tree):
        where = f"{name_of_file}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    on_self = isinstance(sub, ast.Attribute) and ast.unparse(sub.value) == "self"
                    if isinstance(sub, ast.Attribute) and sub.attr in STATE_FIELDS and not on_self:
                        found.append(f"{where} assigns .{sub.attr}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            if name in ("update", "create", "update_or_create", "get_or_create", "bulk_update"):
                for kw in node.keywords:
                    if kw.arg in STATE_FIELDS and _is_item_call(node):
                        found.append(f"{where} {name}({kw.arg}=…)")
            if name == "save":
                for kw in node.keywords:
                    if kw.arg == "update_fields" and STATE_FIELDS & _strings(kw.value):
                        found.append(f"{where} save(update_fields=…)")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            found.append(f"{where} setattr(…)")
    return found


def _parse_all(paths: list[Path]) -> list[ast.Module]:
    """``ast.parse`` of each file with the garbage collector held off. On Python 3.11.7 a
    collection during the parse that runs a finalizer (an asyncio task an earlier test left
    pending) trips CPython's check of the AST's recursion depth (gh-106905, fixed in 3.11.8) and
    the parse raises SystemError: it failed CI once. One collection before all the parses, not
    one per file: late in a full run a collection of the whole heap takes ~0.2 s, and there are
    ~75 files."""
    gc.collect()
    gc.disable()
    try:
        return [ast.parse(path.read_text(), str(path)) for path in paths]
    finally:
        gc.enable()


def _strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _is_item_call(node: ast.Call) -> bool:
    """A call on MediaItem rows (not StatusEvent history rows or other models)."""
    text = ast.unparse(node.func)
    return "StatusEvent" not in text and "PeriodicTask" not in text and "Rendition" not in text


def test_no_module_but_the_lifecycle_writes_an_items_state():
    paths = [
        path
        for folder in APP_DIRS
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != OWNER and "migrations" not in path.parts
    ]
    assert len(paths) > 20  # the folders were found
    offenders = []
    for path, tree in zip(paths, _parse_all(paths), strict=True):
        offenders += _writes(path, tree)
    assert offenders == []


def test_the_check_sees_a_write_when_there_is_one(tmp_path):
    """The rule above cannot pass by finding nothing: a file with each kind of write is caught."""
    sample = ROOT / "tests" / "media_app" / "_ownership_sample.py"
    sample.write_text(
        "def f(item, qs):\n"
        "    item.status = 'Failed'\n"
        "    qs.filter(pk=1).update(progress=5)\n"
        "    item.save(update_fields=['stage'])\n"
        "    setattr(item, 'attempts', 2)\n"
    )
    try:
        assert len(_writes(sample)) == 4
    finally:
        sample.unlink()
