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
  if [ -z "${_APT_UPDATED:-}" ]; then as_root apt-get update -qq; _APT_UPDATED=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_venv() {
  local py=${PYTHON:-python3}
  command -v "$py" >/dev/null || apt_install python3 python3-venv python3-dev
  if [ ! -x "$PY" ]; then
    if ! "$py" -m venv --help >/dev/null 2>&1 || ! "$py" -c 'import ensurepip' 2>/dev/null; then
      apt_install python3-venv
    fi
    log "creating virtualenv in .venv"
    "$py" -m venv "$VENV"
  fi
  local stamp="$VENV/.requirements.sha"
  local want
  want=$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing Python requirements"
    # (grep drops pip's notes about this machine's extra index paths; errors still fail the step)
    "$PY" -m pip install -q --upgrade pip 2> >(grep -v '^WARNING: Location' >&2)
    "$PY" -m pip install -q -r "$ROOT/requirements-dev.txt" 2> >(grep -v '^WARNING: Location' >&2)
    echo "$want" >"$stamp"
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
