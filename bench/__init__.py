"""Benchmarks: every figure that matters, beside a baseline measured in the same run.

Run with ``make bench`` (full) or ``make bench-quick``; see ``docs/performance.md``.
"""
