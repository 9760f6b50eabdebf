#!/usr/bin/env bash
# `make run`: set up, then web + workers + beat (and a local Redis if none answers) until Ctrl-C.
# Every step says what it does: the first run installs for a minute or two.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
log "make run: checking the Python environment (.venv)"
ensure_venv
export PATH="$VENV/bin:$PATH"
export WEB_PORT=${WEB_PORT:-8000}
procfile="$ROOT/.data/Procfile.run"
mkdir -p "$ROOT/.data"
cp Procfile "$procfile"
redis_url=${REDIS_URL:-redis://127.0.0.1:6379/0}
log "looking for Redis at $redis_url"
if ! redis_reachable "$redis_url"; then
  ensure_redis_binary
  port=$("$PY" -c 'import sys, urllib.parse as u; print(u.urlparse(sys.argv[1]).port or 6379)' "$redis_url")
  log "no Redis answered at $redis_url; starting a local redis-server on 127.0.0.1:$port"
  mkdir -p "$ROOT/.data/redis"
  # Append-only persistence: queued work survives a restart of this embedded Redis.
  echo "redis: redis-server --bind 127.0.0.1 --port $port --dir $ROOT/.data/redis --save '' --appendonly yes" >>"$procfile"
fi
log "checking ffmpeg.wasm for the upload page (npm packages, pinned)"
ensure_wasm
log "bringing the database up to date (migrate)"
python manage.py migrate --noinput
log "collecting static files"
python manage.py collectstatic --noinput -v 0
log "checking the admin account"
python manage.py ensure_admin
log "starting web, workers and beat: open http://127.0.0.1:$WEB_PORT/ (admin: http://127.0.0.1:$WEB_PORT/admin/) - Ctrl-C stops everything"
exec honcho start -f "$procfile" -d "$ROOT"
