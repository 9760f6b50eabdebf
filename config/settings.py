"""Settings, all read from the environment, with defaults that run on a bare machine.

Defaults embed what can be embedded (SQLite, local files under DATA_DIR, a local Redis);
production swaps in PostgreSQL, S3 and another broker by environment variables alone.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured
from django.core.management.utils import get_random_secret_key

from pipelines.sniff import ACCEPTED_MIMES

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()
if (BASE_DIR / ".env").exists():
    environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DATA_DIR = Path(env.str("DATA_DIR", default=str(BASE_DIR / ".data"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)

# The key this project once shipped as its default: public, so anyone could sign our upload and
# download URLs with it. Kept only to refuse it.
PUBLISHED_DEV_SECRET_KEY = "dev-insecure-change-me-" + "x" * 20
SECRET_KEY_FILE = DATA_DIR / "secret-key"


def secret_key_from_file(path: Path) -> str:
    """The deployment's own key, made on first start, so no key is ever shared through the source.

    Every process on this machine (web, workers, beat, manage.py) reads the same file. The file
    appears complete or not at all: it is written under a temporary name and hard-linked into
    place, which fails if it exists, so of two processes starting at once one wins and the
    other reads the winner's key. Mode 0600, like the admin password.
    """
    try:
        return _read_secret_key(path)
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # O_EXCL, mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(get_random_secret_key() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race: its key is the one
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            raise ImproperlyConfigured(
                f"Cannot keep a secret key in {path.parent} (no hard links on this file system): set DJANGO_SECRET_KEY."
            ) from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    return _read_secret_key(path)


def _read_secret_key(path: Path) -> str:
    key = path.read_text().strip()
    if len(key) < 50:
        raise ImproperlyConfigured(f"{path} holds no usable secret key; delete it and start again to make a new one.")
    return key


DEBUG = env.bool("DJANGO_DEBUG", default=False)
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="") or secret_key_from_file(SECRET_KEY_FILE)
if SECRET_KEY == PUBLISHED_DEV_SECRET_KEY and not DEBUG:
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY is the development key published in this project's source, so anyone could sign "
        "URLs and sessions for this site: unset it (a random key is then kept in DATA_DIR) or set a secret one."
    )
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

# --- HTTPS ------------------------------------------------------------------------------------
# DJANGO_HTTPS=1 when a TLS proxy (nginx, a load balancer) fronts the site: cookies travel only
# over TLS, browsers are told to use nothing else (HSTS), plain-http requests are redirected,
# and the proxy's X-Forwarded-Proto says whether a request came in over TLS. The proxy must set
# that header itself (overwriting any a client sent), or a client could claim TLS.
HTTPS = env.bool("DJANGO_HTTPS", default=False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = SECURE_SSL_REDIRECT = HTTPS
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    # Load balancers probe the health check over plain http; it must answer, not redirect.
    # (SecurityMiddleware matches these against the path without its leading "/".)
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
# One year: what the browsers' preload lists require. Lower it (say 3600) while first trying HTTPS.
SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=365 * 24 * 3600) if HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", default=True)
SECURE_HSTS_PRELOAD = env.bool("DJANGO_HSTS_PRELOAD", default=True)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_celery_beat",
    "media_app",
    "tasks",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web, worker and beat write to one SQLite file: WAL lets readers run beside a writer, and
    # IMMEDIATE transactions plus a busy timeout turn lock contention into waiting, not errors.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
    test_name = env.str("TEST_DATABASE_PATH", default="")
    if test_name:
        DATABASES["default"]["TEST"] = {"NAME": test_name}
DATABASES["default"]["ATOMIC_REQUESTS"] = False
# A Celery worker process keeps its connection across tasks for this many seconds (None: no
# limit), checked with a ``SELECT 1`` before its first use in a task and replaced if dead; 0
# reconnects for every task, as before. Workers only (config/celery.py): the web stays at 0.
_worker_conn_age = env.str("WORKER_DB_CONN_MAX_AGE", default="600")
WORKER_DB_CONN_MAX_AGE = None if _worker_conn_age.lower() == "none" else int(_worker_conn_age)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Files ----------------------------------------------------------------------------------
STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
WHITENOISE_USE_FINDERS = True
MEDIA_ROOT = Path(env.str("MEDIA_ROOT", default=str(DATA_DIR / "media")))
MEDIA_URL = "/media/"
# Stage work directories: item/stage folders renamed into place when a stage finishes. With
# several worker machines this must be a shared volume (see docs/decisions.md).
WORK_ROOT = Path(env.str("WORK_ROOT", default=str(DATA_DIR / "work")))

STORAGE_BACKEND = env.str("STORAGE_BACKEND", default="local")  # local | s3
if STORAGE_BACKEND == "s3":
    _default_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": env.str("AWS_STORAGE_BUCKET_NAME"),
            "endpoint_url": env.str("AWS_S3_ENDPOINT_URL", default=None),
            "region_name": env.str("AWS_S3_REGION_NAME", default=None),
            "access_key": env.str("AWS_ACCESS_KEY_ID", default=None),
            "secret_key": env.str("AWS_SECRET_ACCESS_KEY", default=None),
            "file_overwrite": False,
            "querystring_expire": env.int("MEDIA_URL_EXPIRY_SECONDS", default=3600),
            "signature_version": env.str("AWS_S3_SIGNATURE_VERSION", default="s3v4"),
        },
    }
else:
    _default_storage = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(MEDIA_ROOT), "base_url": MEDIA_URL},
    }
STORAGES = {
    "default": _default_storage,
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

# --- Redis, Celery, Channels ----------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default=REDIS_URL)
# Hard limit per task (seconds) and the soft one that lets a stage clean up first.
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=3600)
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=3300)
# Redis re-delivers an unacknowledged task after this many seconds; it must exceed the hard
# limit or a long encode would be handed to a second worker while the first still runs.
CELERY_VISIBILITY_TIMEOUT = env.int("CELERY_VISIBILITY_TIMEOUT", default=CELERY_TASK_TIME_LIMIT + 600)
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)

CHANNEL_REDIS_URL = env.str("CHANNEL_REDIS_URL", default=REDIS_URL)
# Pub/sub: one Redis subscription per group per web process and fan-out in process, each event
# published once and decoded once per process (media_app/channel_layers.py; issue 17: 1,000
# sockets per web process). No backlog: a socket's first message is always the saved state.
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "media_app.channel_layers.FanOutChannelLayer",
        "CONFIG": {"hosts": [CHANNEL_REDIS_URL]},
    }
}

# --- Media ----------------------------------------------------------------------------------
# Overrides of pipelines.profiles, e.g. MEDIA_PROFILES='{"video": {"crf": 32}}'.
MEDIA_PROFILES: dict = json.loads(env.str("MEDIA_PROFILES", default="{}"))
MEDIA_MAX_ATTEMPTS = env.int("MEDIA_MAX_ATTEMPTS", default=3)
# First retry waits about this many seconds, doubling (with jitter) up to two minutes.
MEDIA_RETRY_BACKOFF = env.int("MEDIA_RETRY_BACKOFF", default=5)
# At most this many progress saves+broadcasts per second per item.
MEDIA_PROGRESS_PER_SECOND = env.float("MEDIA_PROGRESS_PER_SECOND", default=4.0)

LOGIN_URL = "/admin/login/"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# --- API and uploads ------------------------------------------------------------------------
INSTALLED_APPS += ["rest_framework", "rest_framework.authtoken", "drf_spectacular", "drf_spectacular_sidecar"]

REST_FRAMEWORK = {
    # Token first: an anonymous call then answers 401 with `WWW-Authenticate: Token`.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "media_app.api.errors.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "cpc-media API",
    "DESCRIPTION": "Upload media (presigned PUT or tus 1.0), watch it being processed, download the results.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI (/api/docs/) from our own static files: the site must work on a closed network.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Swagger UI would otherwise send the schema to validator.swagger.io and show its badge.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    # Error answers, headers, tus, presigned PUT, downloads and links: see media_app/api/schema.py.
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "media_app.api.schema.postprocess"],
}

# Upload bodies never pass through `request.body`: the views read them in chunks from the
# request stream, which Django's ASGI handler spools to a temporary file above
# FILE_UPLOAD_MAX_MEMORY_SIZE. So the in-memory cap stays small for every other (JSON) body.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=2_621_440)
FILE_UPLOAD_MAX_MEMORY_SIZE = env.int("FILE_UPLOAD_MAX_MEMORY_SIZE", default=2_621_440)

# Largest file accepted (declared at create, and again while the bytes arrive).
UPLOAD_MAX_BYTES = env.int("UPLOAD_MAX_BYTES", default=8 * 1024**3)
# Types accepted, judged from the content (magic bytes), never from the name or declared type.
# What the web accepts is what the pipeline reads: the sniffer's table of formats (one list for
# the sniff at upload, ffmpeg's demuxer allow-list and this). Narrow it with a list of types.
UPLOAD_ALLOWED_CONTENT_TYPES = env.list("UPLOAD_ALLOWED_CONTENT_TYPES", default=sorted(ACCEPTED_MIMES))
# Per user: bytes held (uploaded or announced) and uploads started but not completed.
UPLOAD_QUOTA_BYTES = env.int("UPLOAD_QUOTA_BYTES", default=50 * 1024**3)
UPLOAD_MAX_UNFINISHED = env.int("UPLOAD_MAX_UNFINISHED", default=10)
# Creates per user (DRF rate syntax: "600/minute", "500/day"). High enough for a whole camera roll
# at once: the byte quota and the number of unfinished uploads are the real guards; this one
# only stops a runaway client.
UPLOAD_CREATE_RATE = env.str("UPLOAD_CREATE_RATE", default="600/minute")
# Lifetime of a presigned upload URL, of a download URL, and of an idle tus upload.
UPLOAD_URL_EXPIRY_SECONDS = env.int("UPLOAD_URL_EXPIRY_SECONDS", default=3600)
DOWNLOAD_URL_EXPIRY_SECONDS = env.int("MEDIA_URL_EXPIRY_SECONDS", default=3600)
UPLOAD_EXPIRY_SECONDS = env.int("UPLOAD_EXPIRY_SECONDS", default=24 * 3600)
# A PUT to our own upload URL (local storage) is received here and moved into storage once its
# size is right: one request on one process, so this need not be shared. tus uploads never touch
# it: their chunks go straight to storage (see media_app/uploads.py).
UPLOAD_STAGING_DIR = Path(env.str("UPLOAD_STAGING_DIR", default=str(DATA_DIR / "uploads-partial")))
# Rate-limit counters and upload locks must be shared by every web process: Redis.
UPLOADS_REDIS_URL = env.str("UPLOADS_REDIS_URL", default=REDIS_URL)
CACHES = globals().get("CACHES") or {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
CACHES["uploads"] = {
    "BACKEND": "django.core.cache.backends.redis.RedisCache",
    "LOCATION": UPLOADS_REDIS_URL,
    "KEY_PREFIX": "uploads",
}

# --- Page and downloads ---
# DASH manifests and segments are kept in Redis for this many seconds after a request reads them
# from storage, so a popular segment costs one storage read per TTL, not one per viewer. Files
# above the cap stream from storage uncached (a segment is a few seconds of video: far below it).
MEDIA_SEGMENT_CACHE_SECONDS = env.int("MEDIA_SEGMENT_CACHE_SECONDS", default=300)
MEDIA_SEGMENT_CACHE_MAX_BYTES = env.int("MEDIA_SEGMENT_CACHE_MAX_BYTES", default=16 * 1024**2)
CACHES["segments"] = {
    "BACKEND": "django.core.cache.backends.redis.RedisCache",
    "LOCATION": env.str("SEGMENT_CACHE_REDIS_URL", default=REDIS_URL),
    "KEY_PREFIX": "segments",
    "TIMEOUT": MEDIA_SEGMENT_CACHE_SECONDS,
}
# The upload page sends tus chunks of this size: big enough to keep a fast link busy, small
# enough that a dropped connection loses little.
UPLOAD_PAGE_CHUNK_BYTES = env.int("UPLOAD_PAGE_CHUNK_BYTES", default=8 * 1024**2)

# --- Operations -----------------------------------------------------------------------------
# Daily backup (media.maintenance.backup): item, output and history rows with a manifest of
# the stored files, one JSON file per day in BACKUP_DIR, kept BACKUP_RETENTION_DAYS days.
BACKUP_DIR = Path(env.str("BACKUP_DIR", default=str(DATA_DIR / "backups")))
BACKUP_RETENTION_DAYS = env.int("BACKUP_RETENTION_DAYS", default=14)
# A Failed item keeps its stage work files this long, so Retry resumes at the failed stage.
WORK_FAILED_KEEP_SECONDS = env.int("WORK_FAILED_KEEP_SECONDS", default=7 * 24 * 3600)
# Watchdog (media.maintenance.watchdog, every WATCHDOG_INTERVAL_SECONDS): an item whose task a
# worker holds but which has not changed for WATCHDOG_STALL_SECONDS is hung (killed, requeued);
# it must exceed the longest stage that reports no progress. One whose task is on no worker and
# in no queue for WATCHDOG_LOST_SECONDS was lost (worker killed, broker restarted): requeued.
WATCHDOG_STALL_SECONDS = env.int("WATCHDOG_STALL_SECONDS", default=900)
WATCHDOG_LOST_SECONDS = env.int("WATCHDOG_LOST_SECONDS", default=120)
# How long a snapshot waits for a worker that heard its ping and has not answered (on Redis it
# ends as soon as every worker the ping reached answered: milliseconds, unless one is hung).
WATCHDOG_INSPECT_TIMEOUT = env.float("WATCHDOG_INSPECT_TIMEOUT", default=1.0)
WATCHDOG_INTERVAL_SECONDS = env.int("WATCHDOG_INTERVAL_SECONDS", default=60)
# A chain publishes its next stage when a stage ends; Celery's default (3 retries in 0.6 s)
# fails the item if the broker is restarting at that moment. ~17 s of retries rides it out.
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": env.int("CELERY_PUBLISH_MAX_RETRIES", default=10),
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 2,
}

# --- WebRTC ingest (WHIP, /api/whip/) ---------------------------------------------------------
# A recording ends at the first of: the publisher's DELETE, the connection failing, no media for
# WHIP_SILENCE_TIMEOUT_SECONDS, WHIP_MAX_SESSION_SECONDS of media, or a rate over WHIP_MAX_BITRATE
# (bits/s, audio and video, over 5 s with a 25 % margin; the SDP answer tells the sender it).
# What was recorded is kept and processed like an upload.
WHIP_MAX_SESSION_SECONDS = env.float("WHIP_MAX_SESSION_SECONDS", default=3600)
WHIP_MAX_BITRATE = env.int("WHIP_MAX_BITRATE", default=8_000_000)
WHIP_MAX_SESSIONS_PER_USER = env.int("WHIP_MAX_SESSIONS_PER_USER", default=2)
WHIP_SILENCE_TIMEOUT_SECONDS = env.float("WHIP_SILENCE_TIMEOUT_SECONDS", default=10)
# STUN/TURN servers for the server's side of ICE (and sent to publishers as Link headers), as
# JSON: '[{"urls": "stun:stun.example.com:3478"}, {"urls": "turn:turn.example.com:3478",
# "username": "u", "credential": "p"}]'. None by default: no request leaves the site. A web host
# with a public address needs none; one behind NAT needs a STUN server (or a TURN relay).
# aiortc takes its UDP ports from the OS's ephemeral range (net.ipv4.ip_local_port_range): it
# has no setting of its own for a port range (docs/deployment.md).
WHIP_ICE_SERVERS: list = json.loads(env.str("WHIP_ICE_SERVERS", default="[]"))
