"""Issue 17's table: each goal, the row that measures it, and the test it must pass.

A section reports its figures as rows; this module is the one place that says which row answers
which goal and what it must reach, so a run ends with the issue's table filled in (value, the
baseline from the same run, the ratio, the target, met or not) and no goal can go missing from
it silently: a goal whose row is absent prints as "not measured".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from bench.harness import Row, check, fmt


@dataclass(frozen=True)
class Check:
    on: str  # "value" or "ratio"
    op: str  # "<", "<=", ">", ">="
    limit: float
    unit: str = ""

    def text(self) -> str:
        return f"{self.op.replace('<=', '≤').replace('>=', '≥')} {self.limit:g}{self.unit} ({self.on})"

    def passes(self, row: Row) -> bool | None:
        return check(row.value if self.on == "value" else row.ratio, self.op, self.limit)


@dataclass(frozen=True)
class Goal:
    name: str  # as the issue's table words it
    pattern: str  # a regular expression matching the row's name (from its start)
    checks: tuple[Check, ...]
    keep_row_verdict: bool = False  # the row's own verdict also counts (the websocket rows: nothing lost)
    full_only: bool = False  # measured by `make bench` only

    def row(self, rows: Sequence[Row]) -> Row | None:
        return next((r for r in rows if re.match(self.pattern, r.name.strip())), None)


ISSUE_17 = (
    Goal("12 MP JPEG → AVIF + WebP (vs a bare Pillow script)", r"image 12 MP JPEG → AVIF\+WebP$",
         (Check("value", "<=", 200, " ms"), Check("ratio", "<=", 0.6))),
    Goal("12 MP HEIC → AVIF + WebP (vs bare)", r"image 12 MP HEIC → AVIF\+WebP$", (Check("ratio", "<=", 1.0),)),
    Goal("video 720p, pipeline / the same plain ffmpeg commands", r"video 720p .*: wall pipeline/plain",
         (Check("ratio", "<=", 1.05),)),
    Goal("audio 60 s, pipeline / one plain ffmpeg command", r"audio: wall pipeline/plain",
         (Check("ratio", "<=", 1.5),)),
    Goal("small images at once: images/s vs media-only ceiling", r"throughput: \d+ small images",
         (Check("ratio", ">=", 0.8),)),
    Goal("websocket: 1,000 subscribers on one web process", r"websocket delay save→client, 1000 subscribers$",
         (Check("value", "<", 250, " ms p95"),), keep_row_verdict=True),
    Goal("websocket: 10,000 subscribers over 4 web processes", r"websocket delay save→client, 10000 subscribers over 4",
         (Check("value", "<", 250, " ms p95"),), keep_row_verdict=True, full_only=True),
    Goal("tus upload on loopback", r"tus upload \d+ MB", (Check("value", ">=", 300, " MB/s"),)),
    Goal("web process RSS growth during the upload", r"web process peak RSS during the",
         (Check("value", "<", 64, " MB growth"),)),
)  # fmt: skip


def _verdict(goal: Goal, row: Row) -> bool | None:
    if goal.name.startswith("web process RSS"):
        growth = None if row.value is None or row.baseline is None else row.value - row.baseline
        return check(growth, "<", 64)
    verdicts = [c.passes(row) for c in goal.checks]
    if goal.keep_row_verdict:
        verdicts.append(row.meets)
    if any(v is False for v in verdicts):
        return False
    return None if any(v is None for v in verdicts) else True


def apply(rows: Sequence[Row]) -> None:
    """Give each goal's row the goal's target and verdict (an older issue's target gives way)."""
    for goal in ISSUE_17:
        row = goal.row(rows)
        if row is not None:
            row.target = " and ".join(c.text() for c in goal.checks) + (
                ", nothing lost" if goal.keep_row_verdict else ""
            )
            row.meets = _verdict(goal, row)


def summary(rows: Sequence[Row], *, quick: bool) -> list[list[str]]:
    """[goal, value, unit, baseline, ratio, target, meets] per goal, in the issue's order."""
    out = []
    for goal in ISSUE_17:
        row = goal.row(rows)
        if row is None:
            why = "make bench only" if goal.full_only and quick else "not measured"
            out.append([goal.name, "—", "", "—", "—", " and ".join(c.text() for c in goal.checks), why])
            continue
        meets = {True: "yes", False: "NO", None: "?"}[_verdict(goal, row)]
        out.append([goal.name, fmt(row.value), row.unit, fmt(row.baseline), fmt(row.ratio), row.target, meets])
    return out


def text_table(cells: list[list[str]]) -> str:
    head = ["issue 17 goal", "value", "unit", "baseline", "ratio", "target", "meets"]
    widths = [max(len(x) for x in col) for col in zip(head, *cells, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), "  ".join("-" * w for w in widths)]
    for row in cells:
        lines.append(
            "  ".join(
                c.rjust(w) if i in (1, 3, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    return "\n".join(lines)


def markdown_table(cells: list[list[str]]) -> list[str]:
    out = ["| issue 17 goal | value | unit | baseline | ratio | target | meets |", "|" + "---|" * 7]
    out += ["| " + " | ".join(c if c != "NO" else "**NO**" for c in row) + " |" for row in cells]
    return out
