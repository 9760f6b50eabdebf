# Shared set-up for `make run` and `make test`: a virtualenv with the requirements, and the
# system packages that pip cannot provide. Sourced, not run.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root for: $*"; return 1; fi
}

apt_install() {
  command -v apt-get >/dev/null || { log "please install: $*"; return 1; }
  # Wait for another apt (unattended upgrades, a second make) instead of failing on its lock.
  local wait=(-o DPkg::Lock::Timeout=300)
  if [ -z "${_APT_UPDATED:-}" ]; then as_root apt-get "${wait[@]}" update -qq; _APT_UPDATED=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get "${wait[@]}" install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_venv() {
  local py=${PYTHON:-python3}
  command -v "$py" >/dev/null || apt_install python3 python3-venv python3-dev
  if [ ! -x "$PY" ]; then
    if ! "$py" -m venv --help >/dev/null 2>&1 || ! "$py" -c 'import ensurepip' 2>/dev/null; then
      apt_install python3-venv
    fi
    log "creating the virtualenv .venv ($("$py" --version 2>&1))"
    "$py" -m venv "$VENV"
  fi
  local stamp="$VENV/.requirements.sha"
  local want
  want=$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # A line per step and pip's own progress: a first install takes a minute or two, and a
    # silent terminal for that long looks like a hang. (PIP_QUIET=-q quietens pip again.)
    log "upgrading pip in .venv"
    # (grep drops pip's notes about this machine's extra index paths; errors still fail the step)
    "$PY" -m pip install ${PIP_QUIET:-} --upgrade pip 2> >(grep -v '^WARNING: Location' >&2)
    log "installing the Python requirements (requirements-dev.txt; the first time takes a minute or two)"
    "$PY" -m pip install ${PIP_QUIET:-} -r "$ROOT/requirements-dev.txt" 2> >(grep -v '^WARNING: Location' >&2)
    echo "$want" >"$stamp"
    log "Python requirements installed"
  fi
}

redis_reachable() {
  "$PY" - "${1:-redis://127.0.0.1:6379/0}" <<'PY'
import sys, redis
try:
    redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()
except Exception:
    sys.exit(1)
PY
}

ensure_redis_binary() {
  command -v redis-server >/dev/null || { log "installing redis-server"; apt_install redis-server; }
}

# --- PostgreSQL for the database-sensitive tests (`make test`'s second pass) --------------------

# Can we log in at this URL? (psycopg comes with the venv: call after ensure_venv.)
pg_reachable() {
  "$PY" - "$1" <<'PY'
import sys, psycopg
try:
    psycopg.connect(sys.argv[1], connect_timeout=3).close()
except Exception as exc:
    print(f"    ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})", file=sys.stderr)
    sys.exit(1)
PY
}

# The newest installed PostgreSQL server's binaries (Debian keeps them out of PATH).
pg_bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1) || true
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

# Server binaries only: Debian's packages would also create (and, where services start, run) a
# `main` cluster on 5432; that is switched off for this install, and the setting put back after.
ensure_pg_binaries() {
  pg_bindir >/dev/null && return 0
  log "installing PostgreSQL (server binaries only; no cluster is created)"
  apt_install postgresql-common
  local conf=/etc/postgresql-common/createcluster.conf saved rc=0
  saved=$(mktemp)
  cp -p "$conf" "$saved"
  echo "create_main_cluster = false" | as_root tee -a "$conf" >/dev/null
  apt_install postgresql || rc=$?
  as_root cp "$saved" "$conf"
  rm -f "$saved"
  return "$rc"
}

# A throwaway cluster: a temporary directory, a free port on 127.0.0.1, superuser `postgres`
# with trust auth, no fsync (its data lives for one run). Sets PG_URL; pg_stop_throwaway stops
# and removes it. initdb refuses to run as root, so as root the cluster belongs to the
# unprivileged `postgres` user that Debian's packages create.
PG_TMP=""
PG_AS=()
pg_start_throwaway() {
  local bin port
  pg_reap_throwaways
  bin=$(pg_bindir)
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  PG_TMP=$(mktemp -d "${TMPDIR:-/tmp}/cpc-pg.XXXXXX")
  echo $$ >"$PG_TMP/owner"
  PG_AS=()
  if [ "$(id -u)" = 0 ]; then
    chown postgres: "$PG_TMP"
    PG_AS=(runuser -u postgres --)
  fi
  # (cd: the postgres user may not be allowed into the caller's directory)
  (cd "$PG_TMP" && "${PG_AS[@]}" "$bin/initdb" -D "$PG_TMP/data" -U postgres -A trust -E UTF8 --locale=C \
    --no-sync >"$PG_TMP/initdb.log" 2>&1) || { cat "$PG_TMP/initdb.log" >&2; return 1; }
  (cd "$PG_TMP" && "${PG_AS[@]}" "$bin/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/server.log" -w -t 60 \
    -o "-p $port -k $PG_TMP -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
-c full_page_writes=off" start >/dev/null) || { cat "$PG_TMP/server.log" >&2; return 1; }
  PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
}

pg_stop_throwaway() {
  [ -n "$PG_TMP" ] || return 0
  (cd "$PG_TMP" && "${PG_AS[@]}" "$(pg_bindir)/pg_ctl" -D "$PG_TMP/data" -m immediate -w stop >/dev/null 2>&1) || true
  rm -rf "$PG_TMP"
  PG_TMP=""
}

# Throwaway clusters of earlier runs killed before their clean-up ran (their owner is gone).
pg_reap_throwaways() {
  local dir owner
  for dir in "${TMPDIR:-/tmp}"/cpc-pg.*; do
    [ -f "$dir/owner" ] || continue
    owner=$(cat "$dir/owner")
    [ -d "/proc/$owner" ] && continue
    log "removing the throwaway PostgreSQL cluster of a run that was killed ($dir)"
    PG_TMP=$dir
    PG_AS=()
    [ "$(id -u)" = 0 ] && PG_AS=(runuser -u postgres --)
    pg_stop_throwaway
  done
}
