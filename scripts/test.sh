#!/usr/bin/env bash
# `make test`: set up, then the whole suite against a real Redis, Celery worker and ffmpeg.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_venv
# The suite starts its own redis-server when none answers on 127.0.0.1:6379.
redis_reachable || ensure_redis_binary
exec "$PY" -m pytest "$@"
