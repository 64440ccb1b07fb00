"""Django settings, read from environment variables (see README, "Settings").

With no variables at all this is a development site: DEBUG on, SQLite under ./data,
Redis on 127.0.0.1:6379, e-mail printed to the console. Set DEBUG=0 for production;
then SECRET_KEY and ALLOWED_HOSTS are required and the security settings turn on.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from photobooth.env import env_bool, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", True)
SECRET_KEY = env_str("SECRET_KEY", "dev-only-insecure-key") if DEBUG else env_str("SECRET_KEY")
ALLOWED_HOSTS = (
    env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"]) if DEBUG else env_list("ALLOWED_HOSTS")
)
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# Everything the site writes (SQLite file, private media) lives under one folder.
DATA_DIR = Path(env_str("DATA_DIR", str(BASE_DIR / "data")))
DATA_DIR.mkdir(parents=True, exist_ok=True)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_rq",
    "django_htmx",
    "axes",
    "studio",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "studio.middleware.htmx_login_redirect",
    # Last, as django-axes asks: it turns a locked-out login into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "photobooth.urls"
ASGI_APPLICATION = "photobooth.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "django.template.context_processors.i18n",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'db.sqlite3'}"),
        conn_max_age=0,  # ASGI: a persistent connection would outlive its thread.
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not memory: tests start real worker processes that share the test database.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}
    # Bursts of uploads (5 people x 20 photos at once) answered 500 "database is locked": a
    # transaction that read first could not take the write lock when another writer held it,
    # and SQLite fails such an upgrade at once instead of waiting. IMMEDIATE takes the write lock
    # at BEGIN, where the busy timeout waits for it; WAL lets readers go on beside the writer.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "home"

# Failed logins: after AXES_FAILURE_LIMIT tries for one username from one address,
# that pair is locked out for LOGIN_LOCKOUT_MINUTES.
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("LOGIN_LOCKOUT_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_LOCKOUT_CALLABLE = "studio.views.login_locked_out"
AXES_RESET_ON_SUCCESS = True
AXES_VERBOSE = False

LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("zh-hans", "简体中文")]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "static"
# Media are private: MEDIA_URL is routed to studio.views.media_file, which checks the owner.
MEDIA_URL = "/media/"
MEDIA_ROOT = DATA_DIR / "media"
_S3_BUCKET = env_str("S3_BUCKET", "")
if _S3_BUCKET:
    _default_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": _S3_BUCKET,
            "endpoint_url": env_str("S3_ENDPOINT_URL", "") or None,
            "region_name": env_str("S3_REGION", "") or None,
            "access_key": env_str("S3_ACCESS_KEY_ID", "") or None,
            "secret_key": env_str("S3_SECRET_ACCESS_KEY", "") or None,
            "default_acl": "private",
            "querystring_auth": True,
            "file_overwrite": False,
        },
    }
else:
    _default_storage = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",  # in MEDIA_ROOT
    }
STORAGES = {
    "default": _default_storage,
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
FILE_UPLOAD_PERMISSIONS = 0o600
FILE_UPLOAD_DIRECTORY_PERMISSIONS = 0o700

# Selfie uploads: limits checked on the server for every file.
PHOTO_MAX_BYTES = env_int("PHOTO_MAX_MB", 15, minimum=1) * 2**20
PHOTO_MAX_PIXELS = env_int("PHOTO_MAX_MEGAPIXELS", 50, minimum=1) * 1_000_000
PHOTOS_PER_PERSONA = 20
PHOTOS_NEEDED = 5
# Above our own per-request limit, so 21 files get our clear message, not Django's 400; not far
# above, since each file may be 15 MB. upload.js stops a larger choice in the browser, and
# templates/400.html explains the rest.
DATA_UPLOAD_MAX_NUMBER_FILES = 2 * PHOTOS_PER_PERSONA
# Request bodies, bounded before Django reads them (photobooth/body_limits.py): the largest is a
# full double's photos plus the form around them (names, token: 1 MiB is far more than enough);
# a larger one is answered 413 unread. A body must arrive within REQUEST_BODY_TIMEOUT_S plus a
# second for every REQUEST_BODY_MIN_KBPS kilobytes received, or it is cut (408).
REQUEST_MAX_BYTES = PHOTOS_PER_PERSONA * PHOTO_MAX_BYTES + 2**20
REQUEST_BODY_TIMEOUT_S = env_int("REQUEST_BODY_TIMEOUT_S", 20, minimum=1)
REQUEST_BODY_MIN_KBPS = env_int("REQUEST_BODY_MIN_KBPS", 10, minimum=1)
# Face analysis: "dlib" (offline default, ships with pip) or "insightface" with a model pack
# folder (e.g. buffalo_l; its licence allows non-commercial research only).
FACE_BACKEND = env_str("FACE_BACKEND", "dlib")
FACE_MODEL_DIR = env_str("FACE_MODEL_DIR", "") or None
# Optional: an inswapper_128-shaped ONNX file (pipeline.swapper; insightface's own is licensed for
# non-commercial research only) that fuses faces instead of the classic fusion. Its latent is
# ArcFace's embedding, so it needs the insightface backend.
FACE_SWAPPER_MODEL = env_str("FACE_SWAPPER_MODEL", "") or None
if FACE_SWAPPER_MODEL and FACE_BACKEND != "insightface":
    raise ImproperlyConfigured("FACE_SWAPPER_MODEL needs FACE_BACKEND=insightface (its latent is ArcFace's embedding)")

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
# redis-py 8 gives every socket a 5 s read timeout, the same as the channel layer's blocking
# receive (BZPOPMIN, 5 s): a page's socket quiet for 5 s lost its live updates. Reads may take
# longer than one blocking receive, and a dead Redis is still noticed.
CHANNEL_LAYER_SOCKET_TIMEOUT_S = 15
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": CHANNEL_LAYER_SOCKET_TIMEOUT_S}]},
    }
}

# Job queues. RQ's 180 s default would kill a training run: each queue has its own limit,
# and failed jobs stay for staff to read for JOB_FAILURE_TTL_HOURS.
GPU_JOB_TIMEOUT_S = env_int("GPU_JOB_TIMEOUT_S", 2 * 3600, minimum=60)  # building a double
PORTRAIT_JOB_TIMEOUT_S = env_int("PORTRAIT_JOB_TIMEOUT_S", 30 * 60, minimum=60)  # one portrait request
DEFAULT_JOB_TIMEOUT_S = env_int("DEFAULT_JOB_TIMEOUT_S", 600, minimum=10)
JOB_FAILURE_TTL_S = env_int("JOB_FAILURE_TTL_HOURS", 7 * 24, minimum=1) * 3600
RQ_QUEUES = {
    "gpu": {"URL": REDIS_URL, "DEFAULT_TIMEOUT": GPU_JOB_TIMEOUT_S},
    "default": {"URL": REDIS_URL, "DEFAULT_TIMEOUT": DEFAULT_JOB_TIMEOUT_S},
}
RQ_SHOW_ADMIN_LINK = True
# A worker that does not fork: models stay loaded between jobs, and CUDA never meets fork().
RQ = {"WORKER_CLASS": "studio.worker.StudioWorker"}
# A running job's worker marks it alive three times per this period; silent longer, it is lost.
JOB_HEARTBEAT_TIMEOUT_S = env_int("JOB_HEARTBEAT_TIMEOUT_S", 150, minimum=5)
# "diffusion" when the models in MODEL_DIR are all present, else "classic"; or force one.
PORTRAIT_ENGINE = env_str("PORTRAIT_ENGINE", "auto")
MODEL_DIR = Path(env_str("MODEL_DIR", str(DATA_DIR / "models")))
# Training length (EasyPhoto: min(photos x 200, 800) steps, a checkpoint every 100) and the
# portrait crop size; lower them only to try things out quickly.
TRAIN_MAX_STEPS = env_int("TRAIN_MAX_STEPS", 800, minimum=1)
TRAIN_CHECKPOINT_EVERY = env_int("TRAIN_CHECKPOINT_EVERY", 100, minimum=1)
# Where a worker trains; a stopped build's folder stays this long so building again resumes
# from its last checkpoint (studio.training_folders). It holds face-derived data: 0 keeps none.
TRAINING_DIR = Path(env_str("TRAINING_DIR", str(DATA_DIR / "training")))
TRAINING_RESUME_HOURS = env_int("TRAINING_RESUME_HOURS", 24, minimum=0)
PORTRAIT_SIZE = env_int("PORTRAIT_SIZE", 512, minimum=64)
# From this many accepted photos one is kept out of training and fusion, and portraits' likeness
# is measured against it (pipeline.preprocess step 4); below it every photo trains.
# (7: PreprocessConfig's own default; settings import no pipeline code, which is heavy.)
HELD_OUT_FROM = env_int("HELD_OUT_FROM", 7, minimum=2)

_EMAIL_HOST = env_str("EMAIL_HOST", "")
if _EMAIL_HOST:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_HOST = _EMAIL_HOST
    EMAIL_PORT = env_int("EMAIL_PORT", 587, minimum=1)
    EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
    EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
    EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", True)
else:
    EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "Photobooth <noreply@localhost>")

# Behind a TLS-terminating proxy, trust its X-Forwarded-Proto header.
if env_bool("BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    # The login throttle keys on the client's address, not the proxy's (shared by everyone).
    AXES_IPWARE_PROXY_COUNT = 1
    AXES_IPWARE_META_PRECEDENCE_ORDER = ("HTTP_X_FORWARDED_FOR", "REMOTE_ADDR")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_HSTS_SECONDS = env_int("HSTS_SECONDS", 0 if DEBUG else 365 * 24 * 3600)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
SECURE_HSTS_PRELOAD = env_bool("HSTS_PRELOAD", not DEBUG)
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}
