#!/usr/bin/env bash
# `make bench` / `make bench-quick`: the set-up of `make test`, then the benchmarks (bench/run.py).
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_venv
# Like the test suite, the benchmark starts its own redis-server when none answers on 127.0.0.1:6379.
redis_reachable || ensure_redis_binary
exec "$PY" -m bench.run "$@"
