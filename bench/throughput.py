"""Throughput: many small images submitted at once to the real worker, and what the queue costs.

Per-job overhead is measured by busy time, not by per-item spans (with 200 items queued, an
item's span is mostly waiting behind the others): the worker's processes were available for
``wall x concurrency`` seconds; the stages' own work (``MediaItem.timings``) used part of it; the
rest per job is the queue's cost: hand-offs through Redis, task bookkeeping, status saves and
broadcasts, the entry task's type detection, and any idle gap.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

from bench import inputs, stack
from bench.harness import Report, Row, median, pct, ratio


def throughput_section(report: Report, owner: Any, *, count: int, concurrency: int) -> None:
    sources = inputs.small_images(min(count, 40))
    # Warm-up: every pool process has imported and forked once before the clock starts.
    warm = [stack.create(p, owner) for p in sources[:concurrency]]
    for item in warm:
        stack.enqueue(item)
    stack.wait([i.pk for i in warm], timeout=120)

    items = [stack.create(p, owner) for p in itertools.islice(itertools.cycle(sources), count)]
    t0 = stack.enqueue(items[0])
    for item in items[1:]:
        stack.enqueue(item)
    done = stack.wait([i.pk for i in items], timeout=60 + 5 * count, interval=0.5)
    failed = [i for i in done if i.status != "Completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} images failed, e.g. {failed[0].error_code}: {failed[0].error_message}")
    wall = (max(i.finished_at for i in done) - t0).total_seconds()
    media = [sum(i.timings.values()) for i in done]
    media_mean = statistics.fmean(media)
    rate = count / wall
    ideal = concurrency / media_mean
    busy_per_job = wall * concurrency / count
    overhead = busy_per_job - media_mean
    latency = [(i.finished_at - t0).total_seconds() for i in done]
    report.add(
        Row(f"throughput: {count} small images at once", rate, "images/s", ideal, ratio(rate, ideal), "", None,
            "", count, f"baseline: {concurrency} processes doing only stage work ({media_mean * 1000:.0f} ms/image)")
    )  # fmt: skip
    report.add(
        Row("  queue overhead per job (queue + bookkeeping)", overhead * 1000, "ms", media_mean * 1000,
            ratio(overhead, media_mean), "", None, f"media p50 {median(media) * 1000:.0f} ms", count,
            f"latency enqueue→Completed p50 {median(latency):.1f} s, p95 {pct(latency, 95):.1f} s")
    )  # fmt: skip
    report.extra["throughput"] = {
        "count": count,
        "concurrency": concurrency,
        "wall_seconds": wall,
        "media_seconds_mean": media_mean,
        "stages_mean_ms": {
            s: round(statistics.fmean(i.timings.get(s, 0.0) for i in done) * 1000, 1) for s in done[0].timings
        },
    }
