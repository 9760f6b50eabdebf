"""Security defaults as a fresh deployment gets them: its own secret key, and a production switch
that leaves ``manage.py check --deploy`` with nothing to report.

Each check runs ``manage.py`` in a subprocess with a fresh DATA_DIR and no DJANGO_SECRET_KEY,
exactly as a new machine starts.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import subprocess
import sys
from pathlib import Path

from config.settings import PUBLISHED_DEV_SECRET_KEY, secret_key_from_file
from tests.env_plugin import ROOT

SHOW = (
    "from django.conf import settings as s; import json; print(json.dumps({k: getattr(s, k) for k in ("
    "'SECRET_KEY', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', 'SECURE_SSL_REDIRECT', 'SECURE_HSTS_SECONDS')}))"
)


def manage(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "DATA_DIR": str(data_dir), **env}
    for name in ("DJANGO_SECRET_KEY", "DJANGO_HTTPS", "DATABASE_URL"):
        if name not in env:
            environ.pop(name, None)
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120
    )


def show(data_dir: Path, **env: str) -> dict:
    proc = manage(data_dir, "shell", "-c", SHOW, **env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_check_deploy_reports_nothing_with_the_https_switch(tmp_path):
    proc = manage(tmp_path / "data", "check", "--deploy", "--fail-level", "DEBUG", DJANGO_HTTPS="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "System check identified no issues (0 silenced)." in proc.stdout, proc.stdout + proc.stderr


def test_the_https_switch_turns_on_secure_cookies_hsts_and_redirects(tmp_path):
    on = show(tmp_path / "data", DJANGO_HTTPS="1")
    assert on["SESSION_COOKIE_SECURE"] and on["CSRF_COOKIE_SECURE"] and on["SECURE_SSL_REDIRECT"]
    assert on["SECURE_HSTS_SECONDS"] >= 365 * 24 * 3600
    off = show(tmp_path / "data")
    assert not (off["SESSION_COOKIE_SECURE"] or off["SECURE_SSL_REDIRECT"] or off["SECURE_HSTS_SECONDS"])


def test_behind_the_tls_proxy_plain_http_redirects_but_the_health_check_answers(tmp_path):
    # Django's test client in the subprocess: the real settings from the environment and the
    # real middleware, no server needed for what SecurityMiddleware decides.
    script = (
        "from django.test import Client; import json; c = Client(HTTP_HOST='localhost'); "
        "plain = c.get('/api/media/'); health = c.get('/healthz'); "
        "tls = c.get('/healthz', HTTP_X_FORWARDED_PROTO='https'); "
        "print(json.dumps([plain.status_code, plain.get('Location'), health.status_code, "
        "tls.status_code, tls.get('Strict-Transport-Security')]))"
    )
    proc = manage(tmp_path / "data", "shell", "-c", script, DJANGO_HTTPS="1")
    assert proc.returncode == 0, proc.stderr
    plain, location, health, tls, hsts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (plain, location) == (301, "https://localhost/api/media/")
    assert health == 200  # load balancers probe over http
    assert tls == 200 and hsts == "max-age=31536000; includeSubDomains; preload"


def test_without_a_secret_key_two_starts_share_one_random_key_kept_0600(tmp_path):
    data = tmp_path / "data"
    first, second = show(data)["SECRET_KEY"], show(data)["SECRET_KEY"]
    assert first == second
    assert first != PUBLISHED_DEV_SECRET_KEY and len(first) >= 50
    key_file = data / "secret-key"
    assert key_file.read_text().strip() == first
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert show(tmp_path / "elsewhere")["SECRET_KEY"] != first  # each deployment its own
    assert show(data, DJANGO_SECRET_KEY="k" * 10 + "an operator's own key" + "z" * 30)["SECRET_KEY"].startswith("kkk")


def _race(path: str, barrier: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue) -> None:
    barrier.wait()
    out.put(secret_key_from_file(Path(path)))


def test_processes_starting_at_once_agree_on_the_key(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for attempt in range(5):
        path = tmp_path / f"key-{attempt}"
        barrier, out = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(path), barrier, out)) for _ in range(8)]
        for p in procs:
            p.start()
        keys = {out.get(timeout=30) for _ in procs}
        for p in procs:
            p.join(10)
        assert keys == {path.read_text().strip()}
        assert sorted(f.name for f in tmp_path.iterdir()) == sorted(f"key-{i}" for i in range(attempt + 1))


def test_the_published_development_key_is_refused_unless_debug(tmp_path):
    proc = manage(tmp_path / "data", "check", DJANGO_SECRET_KEY=PUBLISHED_DEV_SECRET_KEY)
    assert proc.returncode != 0
    assert "ImproperlyConfigured: DJANGO_SECRET_KEY is the development key published" in proc.stderr
    assert show(tmp_path / "data", DJANGO_SECRET_KEY=PUBLISHED_DEV_SECRET_KEY, DJANGO_DEBUG="1")["SECRET_KEY"]
