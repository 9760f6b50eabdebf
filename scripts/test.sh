#!/usr/bin/env bash
# `make test`: set up, then the whole suite against a real Redis, Celery worker and ffmpeg.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_venv
# The suite starts its own redis-server when none answers on 127.0.0.1:6379.
redis_reachable || ensure_redis_binary
# Browser tests (tests/e2e) drive Debian's chromium through Playwright.
command -v chromium >/dev/null || { log "installing chromium"; apt_install chromium; }
# The no-file-access proof for hostile ffmpeg inputs traces ffmpeg's system calls.
command -v strace >/dev/null || { log "installing strace"; apt_install strace; }
exec "$PY" -m pytest "$@"
