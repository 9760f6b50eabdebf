#!/usr/bin/env bash
# `make test`: set up, then the whole suite against a real Redis, Celery worker and ffmpeg on
# SQLite (the embedded default), then the database-sensitive tests (marked `postgres`) again on
# PostgreSQL, where concurrent writers really run side by side.
#
# Arguments go to pytest. With none, both passes run. With some (a file, -k, -x, ...), the SQLite
# pass runs just those and the PostgreSQL pass runs only if TEST_POSTGRES asks for it:
#   TEST_POSTGRES=auto  (default) the PostgreSQL pass only when no arguments are given
#   TEST_POSTGRES=1     always: the same arguments plus `-m postgres` (which replaces a `-m` of yours)
#   TEST_POSTGRES=only  the PostgreSQL pass alone, e.g. `TEST_POSTGRES=only make test ARGS=tests/tasks`
#   TEST_POSTGRES=0     SQLite only
# PostgreSQL is the server at TEST_PG_URL (default postgres://postgres@127.0.0.1:5432/postgres)
# when we can log in there; otherwise a throwaway cluster on a free port in a temporary directory
# (installed with apt first if need be), stopped and removed when this script ends. Each run's test
# database has a name of its own (tests/env_plugin.py), so runs can share a server.
# RabbitMQ, for the other-broker test, is the broker at TEST_AMQP_URL (default
# amqp://guest:guest@127.0.0.1:5672//) when it lets us in; otherwise a throwaway node, likewise.
# The exit status is non-zero if either pass fails, and when the PostgreSQL pass finds no test.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_venv
# The suite starts its own redis-server when none answers on 127.0.0.1:6379, and the Redis-restart
# test always starts one of its own: the binary must be there either way.
ensure_redis_binary
# Browser tests (tests/e2e) drive Debian's chromium through Playwright.
command -v chromium >/dev/null || { log "installing chromium"; apt_install chromium; }
# The upload page's ffmpeg.wasm (tests/e2e/test_wasm.py), from the npm registry, pinned.
ensure_wasm
# The no-file-access proof for hostile ffmpeg inputs traces ffmpeg's system calls.
command -v strace >/dev/null || { log "installing strace"; apt_install strace; }

# Throwaway servers started below are stopped and removed however this script ends.
stop_throwaways() { rabbit_stop_throwaway; pg_stop_throwaway; }
trap stop_throwaways EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mode=${TEST_POSTGRES:-auto}
case "$mode" in
  auto) if [ $# -eq 0 ]; then postgres=1; else postgres=0; fi ;;
  1 | only) postgres=1 ;;
  0) postgres=0 ;;
  *) log "TEST_POSTGRES must be auto, 1, only or 0 (not '$mode')"; exit 2 ;;
esac

# The SQLite pass runs tests/tasks/test_rabbitmq.py against the RabbitMQ at TEST_AMQP_URL (default
# the local one on 5672) when it lets us in; otherwise against a throwaway node on free ports in a
# temporary directory (rabbitmq-server installed with apt first if need be), removed at the end.
AMQP_URL=${TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672//}
if [ "$mode" != only ] && ! amqp_reachable "$AMQP_URL"; then
  log "no RabbitMQ at $(printf '%s' "$AMQP_URL" | sed -E 's#//([^:@/]*):[^@/]*@#//\1:***@#'): starting a throwaway node"
  ensure_rabbitmq_binaries
  rabbit_start_throwaway
fi
export TEST_AMQP_URL=$AMQP_URL

rc_sqlite=0
if [ "$mode" != only ]; then
  [ "$postgres" = 1 ] && log "pass 1 of 2: tests on SQLite"
  # (a DATABASE_URL of the caller's would move this pass off SQLite)
  env -u DATABASE_URL "$PY" -m pytest "$@" || rc_sqlite=$?
  # 2-4: interrupted, internal or usage error; no point in a second pass
  case $rc_sqlite in 2 | 3 | 4) exit "$rc_sqlite" ;; esac
fi
[ "$postgres" = 1 ] || exit "$rc_sqlite"

PG_URL=${TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
shown=$(printf '%s' "$PG_URL" | sed -E 's#//([^:@/]*):[^@/]*@#//\1:***@#')  # no password in logs
if pg_reachable "$PG_URL"; then
  where="the server at $shown"
else
  log "no PostgreSQL to log in to at $shown: starting a throwaway cluster"
  ensure_pg_binaries
  pg_start_throwaway
  where="a throwaway PostgreSQL $(basename "$(dirname "$(pg_bindir)")") cluster at $PG_URL"
fi
if [ "$mode" = only ]; then pass="tests marked postgres"; else pass="pass 2 of 2: tests marked postgres"; fi
log "$pass, on PostgreSQL: $where"
started=$SECONDS
rc_pg=0
DATABASE_URL=$PG_URL "$PY" -m pytest "$@" -m postgres || rc_pg=$?
log "PostgreSQL pass: exit status $rc_pg after $((SECONDS - started)) s"
if [ "$rc_pg" = 5 ]; then
  log "FAILED: the PostgreSQL pass collected no test; mark database-sensitive tests with @pytest.mark.postgres"
fi
[ "$rc_sqlite" = 0 ] || { log "FAILED: the SQLite pass (exit status $rc_sqlite)"; exit "$rc_sqlite"; }
exit "$rc_pg"
