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

# --- RabbitMQ for the other-broker test (tests/tasks/test_rabbitmq.py) ---------------------------

# Does an AMQP broker let us in at this URL? (kombu comes with the venv.)
amqp_reachable() {
  "$PY" - "$1" <<'PY'
import sys, kombu
try:
    conn = kombu.Connection(sys.argv[1], connect_timeout=3)
    conn.ensure_connection(max_retries=1, timeout=5)
    conn.close()
except Exception as exc:
    print(f"    ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})", file=sys.stderr)
    sys.exit(1)
PY
}

RABBIT_BIN=/usr/lib/rabbitmq/bin  # Debian's: the scripts themselves, not /usr/sbin's wrappers

ensure_rabbitmq_binaries() {
  [ -x "$RABBIT_BIN/rabbitmq-server" ] && return 0
  log "installing rabbitmq-server"
  apt_install rabbitmq-server
}

# A throwaway node: its own name, AMQP, distribution and epmd ports on 127.0.0.1, its mnesia,
# config, plugins (none) and cookie in a temporary directory; user guest (loopback only). Sets
# AMQP_URL; rabbit_stop_throwaway stops and removes it. As root the node runs as the unprivileged
# `rabbitmq` user that Debian's package creates. RABBIT_START_SECONDS bounds the start.
RABBIT_TMP=""
RABBIT_AS=()
RABBIT_ENV=()
rabbit_start_throwaway() {
  local amqp dist epmd pid started
  rabbit_reap_throwaways
  read -r amqp dist epmd < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
  RABBIT_TMP=$(mktemp -d "${TMPDIR:-/tmp}/cpc-rabbit.XXXXXX")
  echo $$ >"$RABBIT_TMP/owner"
  echo "$epmd" >"$RABBIT_TMP/epmd-port"
  # The delivery acknowledgement timeout a deployment needs too (docs/deployment.md, "Brokers"):
  # 2 x CELERY_TASK_TIME_LIMIT + 600 s, so a long encode is never taken from its worker.
  printf 'consumer_timeout = 7800000\n' >"$RABBIT_TMP/rabbitmq.conf"
  echo '[].' >"$RABBIT_TMP/enabled_plugins"
  : >"$RABBIT_TMP/rabbitmq-env.conf"  # not /etc/rabbitmq's (its node name, its listeners)
  RABBIT_AS=()
  if [ "$(id -u)" = 0 ]; then
    chown -R rabbitmq: "$RABBIT_TMP"
    RABBIT_AS=(runuser -u rabbitmq --)
  fi
  RABBIT_ENV=(env "HOME=$RABBIT_TMP" "RABBITMQ_NODENAME=cpc-test-$$@localhost"
    "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1" "RABBITMQ_NODE_PORT=$amqp" "RABBITMQ_DIST_PORT=$dist"
    "ERL_EPMD_PORT=$epmd" "ERL_EPMD_ADDRESS=127.0.0.1"
    "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
    "RABBITMQ_CONFIG_FILE=$RABBIT_TMP/rabbitmq.conf" "RABBITMQ_CONF_ENV_FILE=$RABBIT_TMP/rabbitmq-env.conf"
    "RABBITMQ_ENABLED_PLUGINS_FILE=$RABBIT_TMP/enabled_plugins" "RABBITMQ_MNESIA_BASE=$RABBIT_TMP/mnesia"
    "RABBITMQ_PID_FILE=$RABBIT_TMP/node.pid" "RABBITMQ_LOG_BASE=$RABBIT_TMP/log" "RABBITMQ_LOGS=-")
  # (cd: the rabbitmq user may not be allowed into the caller's directory)
  (cd "$RABBIT_TMP" && exec "${RABBIT_AS[@]}" "${RABBIT_ENV[@]}" "$RABBIT_BIN/rabbitmq-server") \
    >"$RABBIT_TMP/server.log" 2>&1 &
  pid=$!
  AMQP_URL="amqp://guest:guest@127.0.0.1:$amqp//"
  started=$SECONDS
  until amqp_reachable "$AMQP_URL" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null || [ $((SECONDS - started)) -ge "${RABBIT_START_SECONDS:-90}" ]; then
      tail -n 30 "$RABBIT_TMP/server.log" >&2
      if kill -0 "$pid" 2>/dev/null; then
        log "FAILED: the throwaway RabbitMQ did not accept AMQP on port $amqp within ${RABBIT_START_SECONDS:-90} s (its log: above)"
      else
        log "FAILED: the throwaway RabbitMQ exited while starting (its log: above)"
      fi
      rabbit_stop_throwaway
      return 1
    fi
    sleep 0.5
  done
  log "RabbitMQ $(sed -n 's/.*Starting RabbitMQ \([0-9.]*\).*/\1/p' "$RABBIT_TMP/server.log" | head -n1) node up after $((SECONDS - started)) s"
}

rabbit_stop_throwaway() {
  [ -n "$RABBIT_TMP" ] || return 0
  local pid
  pid=$(cat "$RABBIT_TMP/node.pid" 2>/dev/null) || true
  (cd "$RABBIT_TMP" && timeout 30 "${RABBIT_AS[@]}" "${RABBIT_ENV[@]}" "$RABBIT_BIN/rabbitmqctl" -q shutdown \
    >/dev/null 2>&1) || true
  # A node that would not stop, or whose CLI could not reach it: its own pid file says which process.
  if [ -n "$pid" ] && { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qxF "HOME=$RABBIT_TMP"; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  epmd -port "$(cat "$RABBIT_TMP/epmd-port")" -kill >/dev/null 2>&1 || true  # our node's own epmd
  rm -rf "$RABBIT_TMP"
  RABBIT_TMP=""
}

# Throwaway nodes of earlier runs killed before their clean-up ran (their owner is gone).
rabbit_reap_throwaways() {
  local dir owner
  for dir in "${TMPDIR:-/tmp}"/cpc-rabbit.*; do
    [ -f "$dir/owner" ] || continue
    owner=$(cat "$dir/owner")
    [ -d "/proc/$owner" ] && continue
    log "removing the throwaway RabbitMQ node of a run that was killed ($dir)"
    RABBIT_TMP=$dir
    RABBIT_AS=()
    RABBIT_ENV=(env "HOME=$dir" "RABBITMQ_NODENAME=cpc-test-$owner@localhost" "ERL_EPMD_PORT=$(cat "$dir/epmd-port")")
    rabbit_stop_throwaway
  done
}

# --- ffmpeg.wasm for the upload page ------------------------------------------------------------

# The pinned npm packages (frontend/ffmpeg/package-lock.json, sha512-checked) unpacked into the
# ignored media_app/static/media_app/wasm/; a no-op when they are there already. No Node needed.
ensure_wasm() {
  "$PY" "$ROOT/scripts/fetch_wasm.py"
}
