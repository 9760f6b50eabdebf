"""``python -m bench.run [--quick] [--only video,audio,...]``: every benchmark, one table.

Writes ``bench/results/latest.json`` and ``latest.md``. Runs against the embedded defaults
(SQLite, local storage) and a Redis database of its own, with the real Celery worker and the real
ASGI server as subprocesses, the way the test suite runs them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import targets
from bench.harness import CACHE, REAL, RESULTS, Report, Row, TreeSampler, fmt, load, machine, section, setup_django

SECTIONS = ("video", "ladder", "audio", "images", "thumbnails", "throughput", "websocket", "chunked", "tus")
# The quick run keeps to issue 17's table and what is cheap; the ladder (issue 18) and the
# split encode over two hosts (issue 12) take minutes each: `make bench`, or `--only` them.
FULL_ONLY = ("ladder", "chunked")
# Run only when named: the full run's websocket section holds these rows already.
# "websocket-spread": the 1-subscriber baseline and the row over several web processes alone.
NAMED_ONLY = ("websocket-spread",)


@dataclass(frozen=True)
class Plan:
    video_heights: tuple[int, ...]
    video_reps: int
    vmaf_subsample: int
    audio_reps: int
    image_reps: int
    image_worker_reps: int
    thumb_heights: tuple[int, ...]
    thumb_reps: int
    throughput_images: int
    ws_counts: tuple[int, ...]
    ws_items: int
    ws_spread: tuple[int, int] | None  # (web processes, subscribers over them)
    tus_mb: int


# Two video pairs, not one: one pair's ratio moved 0.98-1.16 between runs of the same code on a
# quiet machine (the full run's three: 1.03); 80 images, not 40, for the same reason.
QUICK = Plan((720,), 2, 10, 3, 3, 1, (720,), 5, 80, (1, 1000), 3, None, 200)
FULL = Plan((720, 1080), 3, 3, 5, 11, 5, (720, 1080), 11, 200, (1, 100, 250, 500, 1000), 5, (4, 10_000), 1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the short run (< 3 minutes on 2 cores)")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS + NAMED_ONLY)}")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where latest.json and latest.md go (default: bench/results/tmp/, git-ignored)",
    )
    parser.add_argument(
        "--commit-results",
        action="store_true",
        help="write them to bench/results/ instead, the committed figures (a full run on a quiet machine)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy: the worker during audio and throughput, the web process during websocket",
    )
    args = parser.parse_args(argv)
    # A run leaves the working tree as it was, unless its figures are meant to be committed.
    args.out = args.out or (RESULTS if args.commit_results else RESULTS / "tmp")
    only = [s for s in args.only.split(",") if s] or [s for s in SECTIONS if not (args.quick and s in FULL_ONLY)]
    unknown = set(only) - set(SECTIONS) - set(NAMED_ONLY)
    if unknown:
        parser.error(f"unknown sections: {sorted(unknown)}")
    plan = QUICK if args.quick else FULL
    if not REAL.is_dir():
        parser.error(f"the real samples are missing: expected in {REAL} (beside the repository, as for the tests)")

    load_start = load()
    started = time.monotonic()
    print(f"cpc-media benchmark ({'quick' if args.quick else 'full'}), load average {load_start}", flush=True)
    run_dir = setup_django()

    from bench import av, images, live, stack, throughput, tus
    from bench.chunked import chunked_section
    from bench.ladder import ladder_section
    from bench.profile import WorkerProfile, summarize
    from tests.conftest import AsgiServer, Worker

    report = Report(quick=args.quick)
    report.extra["machine"] = machine()
    errors: list[str] = []

    def attempt(name: str, fn: Callable[[], None], *, profile: bool = False, pid: int | None = None) -> None:
        if name not in only:
            return
        raw = CACHE / f"profile-{name}.raw"
        raw.unlink(missing_ok=True)
        with section(name):
            try:
                if profile and args.profile:
                    with WorkerProfile(pid or worker.proc.pid, raw):  # type: ignore[union-attr]
                        fn()
                    report.extra.setdefault("profiles", {})[name] = summarize(raw, buckets_too=pid is None)
                    print("\n".join("   " + line for line in report.extra["profiles"][name]), flush=True)
                else:
                    fn()
            except Exception:  # noqa: BLE001 - one broken section must not hide the others' figures
                traceback.print_exc()
                errors.append(f"{name}: {traceback.format_exc(limit=1).strip().splitlines()[-1]}")

    worker = Worker(run_dir / "logs" / "worker.log")
    server = AsgiServer(run_dir / "logs" / "asgi.log")
    try:
        worker.start()
        server.start()
        concurrency = len(worker.pool_pids())
        owner = stack.user("bench")
        with TreeSampler(worker.proc.pid) as worker_memory:  # type: ignore[union-attr]
            for height in plan.video_heights:
                attempt(
                    "video",
                    lambda h=height: av.video_section(
                        report, owner, height=h, reps=plan.video_reps,
                        vmaf_subsample=plan.vmaf_subsample if av.vmaf_available() else 0,
                    ),
                )  # fmt: skip
            attempt(
                "ladder",
                lambda: ladder_section(
                    report, owner, reps=1 if args.quick else 2,
                    vmaf_subsample=plan.vmaf_subsample if av.vmaf_available() else 0,
                ),
            )  # fmt: skip
            attempt("audio", lambda: av.audio_section(report, owner, reps=plan.audio_reps), profile=True)
            attempt(
                "images",
                lambda: images.image_section(report, owner, reps=plan.image_reps, worker_reps=plan.image_worker_reps),
            )
            attempt(
                "thumbnails",
                lambda: av.thumbnail_section(report, heights=list(plan.thumb_heights), reps=plan.thumb_reps),
            )
            attempt(
                "throughput",
                lambda: throughput.throughput_section(
                    report, owner, count=plan.throughput_images, concurrency=concurrency
                ),
                profile=True,
            )
            attempt(
                "websocket",
                lambda: live.websocket_section(
                    report, server, counts=list(plan.ws_counts), items=plan.ws_items, spread=plan.ws_spread
                ),
                profile=True,
                pid=server.proc.pid,  # type: ignore[union-attr]
            )
            attempt(
                "websocket-spread",
                lambda: live.websocket_section(report, server, counts=[1], items=plan.ws_items, spread=FULL.ws_spread),
                profile=True,
                pid=server.proc.pid,  # type: ignore[union-attr]
            )
        peak = worker_memory.peak
        report.add(
            Row("worker peak RSS (celery main + pool processes)", peak.processes_mb, "MB", peak.start_mb,
                peak.processes_mb / peak.start_mb if peak.start_mb else None, "", None, "", 1,
                f"{concurrency} pool processes; baseline: at start")
        )  # fmt: skip
        report.add(
            Row("worker peak RSS of one child (ffmpeg / decoder)", peak.largest_child_mb, "MB", None, None, "", None,
                "", 1, "sampled every 0.1 s")
        )  # fmt: skip
        # The upload completes into a queued item: stop the worker first so it does not process
        # the padded file while later figures are taken.
        worker.stop()
        # Its own pinned workers (one core each), with the suite's worker stopped.
        attempt("chunked", lambda: chunked_section(report, owner, run_dir))
        attempt("tus", lambda: tus.tus_section(report, server, size_mb=plan.tus_mb))
    finally:
        worker.stop()
        server.stop()

    load_end = load()
    minutes = (time.monotonic() - started) / 60
    targets.apply(report.rows)
    goals = targets.summary(report.rows, quick=args.quick)
    doc = {
        "rows": [r.as_dict() for r in report.rows],
        "goals": goals,
        "machine": report.extra.pop("machine"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load": {"start": load_start, "end": load_end},
        "mode": "quick" if args.quick else "full",
        "minutes": round(minutes, 2),
        "sections": only,
        "details": report.extra,
        "errors": errors,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(_finite(doc), indent=1, ensure_ascii=False) + "\n")
    (args.out / "latest.md").write_text(markdown(doc))
    print("\n" + table(doc["rows"]))
    print("\n" + targets.text_table(goals))
    print(f"\nload average: start {load_start}, end {load_end}; {minutes:.1f} min; wrote {args.out}/latest.json, .md")
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    return 1 if errors else 0


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a figure that could not be measured is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


COLUMNS = ("name", "value", "unit", "baseline", "ratio", "target", "meets", "spread", "n", "note")


def _cells(row: dict[str, Any]) -> list[str]:
    meets = {True: "yes", False: "**NO**", None: ""}[row["meets"]]
    return [
        row["name"].strip() if not row["name"].startswith("  ") else "↳ " + row["name"].strip(),
        fmt(row["value"]),
        row["unit"],
        fmt(row["baseline"]),
        fmt(row["ratio"]),
        row["target"],
        meets,
        row["spread"],
        str(row["n"]),
        row["note"],
    ]


def table(rows: list[dict[str, Any]]) -> str:
    cells = [[c.replace("**", "") for c in _cells(r)[:9]] for r in rows]
    head = ["figure", "value", "unit", "baseline", "ratio", "target", "meets", "spread", "n"]
    widths = [max(len(x) for x in col) for col in zip(head, *cells, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        padded = (
            c.rjust(w) if i in (1, 3, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    out = [
        f"# Benchmark results ({doc['mode']})",
        "",
        f"- date: {doc['date']}; {doc['minutes']} min",
        f"- machine: {m['nproc']} cores, {m['cpu']}, {m['memory_gb']} GB RAM, Linux {m['kernel']}, "
        f"virtualised: {m['hypervisor']}",
        f"- software: Python {m['python']}, ffmpeg {m['ffmpeg']}, Pillow {m['pillow']}",
        f"- load average (1, 5, 15 min): start {doc['load']['start']}, end {doc['load']['end']}",
        "- ratio = value / baseline; the target says whether it applies to the value or the ratio.",
        "",
        *(
            ["## Issue 17's table", "", *targets.markdown_table(doc["goals"]), "", "## Every figure", ""]
            if doc.get("goals")
            else []
        ),
        "| figure | value | unit | baseline | ratio | target | meets | spread | n | note |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in doc["rows"]:
        out.append("| " + " | ".join(c.replace("|", "/") for c in _cells(row)) + " |")
    details = doc["details"]
    if details.get("video") or details.get("audio"):
        out += ["", "## Where the time goes (median seconds per stage, through the worker)", ""]
        for key, value in sorted(details.get("video", {}).items()):
            out.append(f"- video {key}: {value['stages_median']}")
        if "audio" in details:
            out.append(f"- audio: {details['audio']['stages_median']}")
        if "throughput" in details:
            out.append(f"- small image (mean ms): {details['throughput']['stages_mean_ms']}")
    for name, lines in details.get("profiles", {}).items():
        who = "web process" if name == "websocket" else "worker"
        out += ["", f"## Profile of the {who} during {name} (py-spy)", "", *lines]
    if doc["errors"]:
        out += ["", "## Errors", "", *[f"- {e}" for e in doc["errors"]]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
