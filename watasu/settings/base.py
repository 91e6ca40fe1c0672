"""Django settings for the Watasu-compatible sandbox platform.

Every value an operator may change comes from the environment through
`watasu.settings.env.Env`. The defaults are the embedded ones: a SQLite file
and a file-system Celery broker under the data directory, so `make run` needs
no extra server. `DATABASE_URL` and `REDIS_URL` switch to PostgreSQL and Redis.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
from pathlib import Path

import django
from django.core.exceptions import ImproperlyConfigured

from watasu.settings.env import Env

env = Env()

BASE_DIR = Path(__file__).resolve().parent.parent.parent
DATA_DIR = env.path("WATASU_DATA_DIR", "/var/lib/watasu")
CACHE_DIR = env.path("WATASU_CACHE_DIR", "/var/cache/watasu")


def _secret_key() -> str:
    """The configured key, else one generated once and kept in the data directory."""
    configured = env.str("WATASU_SECRET_KEY", "")
    if configured:
        return configured
    key_file = DATA_DIR / "secret_key"
    if not key_file.exists():
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_urlsafe(50))
    return key_file.read_text().strip()


# `embedded` (the default: one machine, generated secrets) or `production`, which
# refuses to start without an explicit secret key and encryption key.
DEPLOYMENT = env.choice("WATASU_DEPLOYMENT", "embedded", ("embedded", "production"))
SECRET_KEY = _secret_key()
# Encrypt secrets at rest (watasu/crypto.py): the first key encrypts, all decrypt.
# WATASU_ENCRYPTION_KEY (one key) is still read; without either, embedded mode
# derives a key from SECRET_KEY.
ENCRYPTION_KEYS = env.list("WATASU_ENCRYPTION_KEYS", []) or [
    key for key in [env.str("WATASU_ENCRYPTION_KEY", "")] if key
]
if DEPLOYMENT == "production" and not (env.str("WATASU_SECRET_KEY", "") and ENCRYPTION_KEYS):
    raise ImproperlyConfigured(
        "WATASU_DEPLOYMENT=production needs WATASU_SECRET_KEY and "
        "WATASU_ENCRYPTION_KEYS set (no generated or derived keys in production)."
    )
DEBUG = env.bool("WATASU_DEBUG", False)
ALLOWED_HOSTS = env.list("WATASU_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
PUBLIC_URL = env.str("WATASU_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")
# With a domain, data planes live at {route_token}.sandbox.{domain} (wildcard DNS);
# without one, at {PUBLIC_URL}/sandboxes-dp/{route_token}.
DATA_PLANE_DOMAIN = env.str("WATASU_DATA_PLANE_DOMAIN", "")
DATA_PLANE_SCHEME = env.choice("WATASU_DATA_PLANE_SCHEME", "https", ("http", "https"))
# How long the edge waits on a silent guest agent (between bytes) before giving up; long
# enough for a slow git clone, short enough to free a stuck connection eventually.
EDGE_AGENT_TIMEOUT_SECONDS = env.int("WATASU_EDGE_AGENT_TIMEOUT_SECONDS", 600, min=1)
# Auto-resume at the edge: a request waits at most this long for its sandbox's resume
# (shared by every request for that sandbox), then gets 503 + Retry-After.
EDGE_RESUME_WAIT_SECONDS = env.int("WATASU_EDGE_RESUME_WAIT_SECONDS", 60, min=1)
EDGE_RESUME_THREADS = env.int("WATASU_EDGE_RESUME_THREADS", 4, min=1)
EDGE_LOOKUP_THREADS = env.int("WATASU_EDGE_LOOKUP_THREADS", 16, min=1)
EDGE_MAX_SOCKETS_PER_SANDBOX = env.int("WATASU_EDGE_MAX_SOCKETS_PER_SANDBOX", 64, min=1)
# How often an open dashboard terminal's socket re-checks that its user may still use the
# sandbox (removed or demoted: the socket is closed).
EDGE_ACCESS_RECHECK_SECONDS = env.int("WATASU_EDGE_ACCESS_RECHECK_SECONDS", 5, min=1)
# A build worker renews its build's lease every quarter of this; a build whose lease ran
# out (the worker died) is failed by the builds sweep.
TEMPLATE_BUILD_LEASE_SECONDS = env.int("WATASU_TEMPLATE_BUILD_LEASE_SECONDS", 120, min=4)
# How long a template's ready check may take to first succeed before the build fails.
TEMPLATE_READY_TIMEOUT_SECONDS = env.int("WATASU_TEMPLATE_READY_TIMEOUT_SECONDS", 180, min=1)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's assets for /v1/docs, served as static files
    "teams",
    "templates_app",
    "sandboxes",
    "volumes",
    "billing",
    "dashboard",
]

MIDDLEWARE = [
    # First: oversized bodies and NULs in /v1/ paths and queries are refused before anything reads them.
    "watasu.api.middleware.ApiInputMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "dashboard.middleware.ContentSecurityPolicyMiddleware",
    "watasu.api.idempotency.IdempotencyMiddleware",
]

ROOT_URLCONF = "watasu.urls"
WSGI_APPLICATION = "watasu.wsgi.application"
ASGI_APPLICATION = "watasu.asgi.application"
# The SDK never follows redirects on POST/PUT: paths have no trailing slash.
APPEND_SLASH = False

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
                "dashboard.context.dashboard",
            ],
        },
    },
]

DATABASES = {"default": env.database("DATABASE_URL", DATA_DIR / "watasu.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "teams.User"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
# Serve the apps' static files straight from their directories too, so the dashboard works
# before (or without) `collectstatic`, as in tests; `make run` still collects them.
WHITENOISE_USE_FINDERS = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "filters": {"route_tokens": {"()": "watasu.logredact.RedactRouteTokens"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["route_tokens"]}
    },
    # httpx logs every proxied data-plane request at INFO; the edge logs what matters itself.
    "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}},
    "root": {
        "handlers": ["console"],
        "level": env.choice("WATASU_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
    },
}

# --- REST API -----------------------------------------------------------------

# Control-plane requests per API key (watasu/api/throttling.py); empty turns it off.
API_RATE_LIMIT = env.str("WATASU_API_RATE_LIMIT", "1200/min")
_RATE = r"[1-9][0-9]*/(s|sec|second|m|min|minute|h|hour|d|day)"
if API_RATE_LIMIT and not re.fullmatch(_RATE, API_RATE_LIMIT):
    raise ImproperlyConfigured(
        f"WATASU_API_RATE_LIMIT must look like 1200/min (or be empty), not {API_RATE_LIMIT!r}."
    )

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["teams.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["watasu.api.permissions.ApiKeyScope"],
    "DEFAULT_PARSER_CLASSES": ["watasu.api.parsers.StrictJSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "watasu.api.pagination.NextTokenPagination",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "watasu.api.errors.exception_handler",
    "DEFAULT_THROTTLE_CLASSES": ["watasu.api.throttling.ApiKeyRateThrottle"],
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Watasu Sandboxes API",
    "DESCRIPTION": "Control plane of a self-hostable, Watasu-compatible sandbox platform.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "VersionStatusEnum": "templates_app.models.VersionStatus",
        "BuildStatusEnum": "templates_app.api.serializers.BUILD_STATUSES",
    },
    # /v1/docs takes Swagger UI from drf-spectacular-sidecar: a self-hosted install needs no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    # No validator badge: Swagger UI would load it from swagger.io, telling it the schema's URL.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
}

# The largest request body (JSON with a template build's files included); larger is a 413.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("WATASU_MAX_REQUEST_BODY_BYTES", 10 * 1024 * 1024, min=1024)
API_PAGE_SIZE_DEFAULT = env.int("WATASU_PAGE_SIZE_DEFAULT", 50, min=1, max=1000)
API_PAGE_SIZE_MAX = env.int("WATASU_PAGE_SIZE_MAX", 100, min=1, max=1000)
IDEMPOTENCY_TTL_SECONDS = env.int("WATASU_IDEMPOTENCY_TTL_SECONDS", 24 * 3600, min=60)
# An in-flight idempotency record older than this belongs to a crashed request
# and may be taken over by a retry.
IDEMPOTENCY_LEASE_SECONDS = env.int("WATASU_IDEMPOTENCY_LEASE_SECONDS", 600, min=10)
API_KEY_LAST_USED_RESOLUTION_SECONDS = 60

# --- Sandbox limits, quotas and prices (GET /v1/sandbox_limits) -----------------

# The one default shape: the `base` template's baseline and that of every template built
# without cpu/memory, hence what a create without cpu_count/memory_mb gets on them.
SANDBOX_FALLBACK_CPU = env.int("WATASU_FALLBACK_CPU", 1, min=1)
SANDBOX_FALLBACK_MEMORY_MB = env.int("WATASU_FALLBACK_MEMORY_MB", 512, min=256)
SANDBOX_ALLOWED_CPU = env.int_list("WATASU_ALLOWED_CPU", [1, 2, 4, 8])
SANDBOX_MEMORY_MIN_MB = env.int("WATASU_MEMORY_MIN_MB", 512, min=128)
SANDBOX_MEMORY_MAX_MB = env.int("WATASU_MEMORY_MAX_MB", 16384, min=128)
SANDBOX_MEMORY_INCREMENT_MB = env.int("WATASU_MEMORY_INCREMENT_MB", 512, min=1)
SANDBOX_MAX_TIMEOUT_SECONDS = env.int("WATASU_MAX_TIMEOUT_SECONDS", 86400, min=1)
SANDBOX_DEFAULT_NETWORK_CLASS = env.str("WATASU_DEFAULT_NETWORK_CLASS", "standard")


def _shapes(parts: list[str]) -> list[tuple[int, int]]:
    """WATASU_SNAPSHOT_SHAPES (`2x1024,4x2048`) as (vCPUs, MiB) pairs, each one a create may ask for."""
    shapes = []
    for part in parts:
        cpu, _, memory = part.lower().partition("x")
        if not (cpu.isdigit() and memory.isdigit()):
            raise ImproperlyConfigured(f"WATASU_SNAPSHOT_SHAPES: '{part}' is not <vcpus>x<MiB> (2x1024).")
        shape = (int(cpu), int(memory))
        fits = SANDBOX_MEMORY_MIN_MB <= shape[1] <= SANDBOX_MEMORY_MAX_MB
        if shape[0] not in SANDBOX_ALLOWED_CPU or not fits or shape[1] % SANDBOX_MEMORY_INCREMENT_MB:
            raise ImproperlyConfigured(f"WATASU_SNAPSHOT_SHAPES: {part} is not a shape a sandbox may have.")
        shapes.append(shape)
    return sorted(set(shapes))


# Shapes whose memory snapshot every provider template version (`base` too) gets as soon as
# it is ready; any other shape gets one when a sandbox first asks for it (docs/runtime.md).
SNAPSHOT_SHAPES = _shapes(env.list("WATASU_SNAPSHOT_SHAPES", []))
# At most this many shape snapshots made on demand per template version (each takes about
# its guest's used memory on disk); 0 makes none, so other shapes always cold-boot.
SNAPSHOT_SHAPES_MAX = env.int("WATASU_SNAPSHOT_SHAPES_MAX", 8, min=0)

QUOTA_DEFAULT_MAX_RUNNING_INSTANCES = env.int("WATASU_QUOTA_MAX_RUNNING_INSTANCES", 100, min=0)
QUOTA_DEFAULT_MAX_VCPU_COUNT = env.int("WATASU_QUOTA_MAX_VCPU_COUNT", 256, min=0)
QUOTA_DEFAULT_MAX_MEMORY_MB = env.int("WATASU_QUOTA_MAX_MEMORY_MB", 524288, min=0)
# Teams one user may own besides the personal one (each has its own quota).
MAX_TEAMS_PER_USER = env.int("WATASU_MAX_TEAMS_PER_USER", 10, min=0)

PRICE_CURRENCY = env.str("WATASU_PRICE_CURRENCY", "EUR")
PRICE_VCPU_SECOND = env.decimal("WATASU_PRICE_VCPU_SECOND", "0.000010")
PRICE_MEMORY_GIB_SECOND = env.decimal("WATASU_PRICE_MEMORY_GIB_SECOND", "0.000002")
# Storage per GiB-month (a month is 30 days); an empty value bills that line item at zero.
PRICE_STOPPED_DISK_GIB_MONTH = env.decimal("WATASU_PRICE_STOPPED_DISK_GIB_MONTH", "0.10")
PRICE_CHECKPOINT_GIB_MONTH = env.decimal("WATASU_PRICE_CHECKPOINT_GIB_MONTH", "0.10")
PRICE_TEMPLATE_GIB_MONTH = env.decimal("WATASU_PRICE_TEMPLATE_GIB_MONTH", "0.10")
PRICE_VOLUME_GIB_MONTH = env.decimal("WATASU_PRICE_VOLUME_GIB_MONTH", "0.10")

# --- Billing -----------------------------------------------------------------------
# Metering always runs; enforcement (suspension when the balance is exhausted) is the
# operator's choice. The embedded default does not enforce, so a fresh install's key
# creates sandboxes at once.
BILLING_ENFORCE = env.bool("WATASU_BILLING_ENFORCE", False)
# Credited to every new team's balance (an operator grant), in the currency above.
BILLING_STARTING_CREDIT = env.decimal("WATASU_BILLING_STARTING_CREDIT", "0")
# After the balance reaches zero, this long before the team is suspended.
BILLING_GRACE_SECONDS = env.int("WATASU_BILLING_GRACE_SECONDS", 300, min=0)
# While enforced, usage below this balance is waived (recorded, not charged): storage
# keeps accruing after suspension only down to here. Nothing is ever deleted for money.
BILLING_NEGATIVE_FLOOR = env.decimal("WATASU_BILLING_NEGATIVE_FLOOR", "-5.00")
# Owners are emailed once when the balance falls below this (and the API flags it).
BILLING_LOW_BALANCE = env.decimal("WATASU_BILLING_LOW_BALANCE", "1.00")
# Metering windows: runtime in short ones, storage in long ones; a window is billed
# once it ended BILLING_SETTLE_SECONDS ago (transitions committing late still count).
BILLING_RUNTIME_WINDOW_SECONDS = env.int("WATASU_BILLING_RUNTIME_WINDOW_SECONDS", 60, min=1)
BILLING_STORAGE_WINDOW_SECONDS = env.int("WATASU_BILLING_STORAGE_WINDOW_SECONDS", 3600, min=1)
BILLING_SETTLE_SECONDS = env.int("WATASU_BILLING_SETTLE_SECONDS", 30, min=0)
# The edge reads a team's suspension from the cache for at most this long.
BILLING_SUSPENSION_CACHE_SECONDS = env.int("WATASU_BILLING_SUSPENSION_CACHE_SECONDS", 5, min=0)
# Prices include this tax; statements and receipts show the part of it they contain.
BILLING_TAX_NAME = env.str("WATASU_BILLING_TAX_NAME", "VAT")
BILLING_TAX_RATE = env.decimal("WATASU_BILLING_TAX_RATE", "0")
BILLING_TOP_UP_MIN = env.decimal("WATASU_BILLING_TOP_UP_MIN", "5.00")
BILLING_TOP_UP_MAX = env.decimal("WATASU_BILLING_TOP_UP_MAX", "10000.00")
# Stripe (top-ups). Without a secret key the installation runs on operator credits only.
STRIPE_SECRET_KEY = env.str("WATASU_STRIPE_SECRET_KEY", "")
STRIPE_PUBLISHABLE_KEY = env.str("WATASU_STRIPE_PUBLISHABLE_KEY", "")
STRIPE_WEBHOOK_SECRET = env.str("WATASU_STRIPE_WEBHOOK_SECRET", "")
# Another Stripe-compatible endpoint (a test stand-in such as localstripe).
STRIPE_API_BASE = env.str("WATASU_STRIPE_API_BASE", "")
STRIPE_TIMEOUT_SECONDS = env.int("WATASU_STRIPE_TIMEOUT_SECONDS", 20, min=1)

# --- Volumes -----------------------------------------------------------------------

# Every volume is this size (the platform baseline; a sparse file: only written blocks
# take host disk).
VOLUME_SIZE_GIB = env.int("WATASU_VOLUME_SIZE_GIB", 10, min=1, max=1024)
# Per team: how many volumes, and their total size.
VOLUME_MAX_PER_TEAM = env.int("WATASU_VOLUME_MAX_PER_TEAM", 20, min=0)
VOLUME_MAX_TOTAL_GIB = env.int("WATASU_VOLUME_MAX_TOTAL_GIB", 200, min=0)
# Volumes one sandbox may mount (each is one SCSI disk of the VM's controller).
VOLUME_MAX_MOUNTS = env.int("WATASU_VOLUME_MAX_MOUNTS", 8, min=1, max=16)
# The largest file a detached read or write moves: 413 above. It travels base64 in JSON,
# so keep it under 3/4 of WATASU_MAX_REQUEST_BODY_BYTES.
VOLUME_MAX_FILE_BYTES = env.int("WATASU_VOLUME_MAX_FILE_BYTES", 5 * 2**20, min=1024)

# --- Checkpoints ---------------------------------------------------------------------

# Per team: how many checkpoints may exist (failed ones do not count).
CHECKPOINT_MAX_PER_TEAM = env.int("WATASU_CHECKPOINT_MAX_PER_TEAM", 50, min=0)
# ... and the host disk they may take together (each is what its sandbox wrote to its root disk).
CHECKPOINT_MAX_TOTAL_GIB = env.int("WATASU_CHECKPOINT_MAX_TOTAL_GIB", 100, min=0)
# A capture or a restore's disk copy is refused (507) when it would leave less than this free
# on the host's data disk, which every sandbox's disk shares.
HOST_MIN_FREE_GIB = env.int("WATASU_HOST_MIN_FREE_GIB", 5, min=0)
# A guest-mode checkpoint freezes the guest's root filesystem; the guest thaws it by
# itself after this long even if the host never asks (a host that died mid-capture).
CHECKPOINT_FREEZE_SECONDS = env.int("WATASU_CHECKPOINT_FREEZE_SECONDS", 10, min=1, max=60)
# How long a create or restore waits for a pending checkpoint before a 409.
CHECKPOINT_WAIT_SECONDS = env.int("WATASU_CHECKPOINT_WAIT_SECONDS", 120, min=1)
# Checkpoints whose capture was cut short (its process died) stay listed as failed this long,
# then the retention sweep removes them.
CHECKPOINT_FAILED_RETENTION_SECONDS = env.int("WATASU_CHECKPOINT_FAILED_RETENTION_SECONDS", 86400, min=0)

# --- Runtime (libvirt + QEMU) -------------------------------------------------------


def _host_memory_mb() -> int:
    with open("/proc/meminfo") as meminfo:
        total_kb = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
    return total_kb // 1024


RUNTIME_LIBVIRT_URI = env.str("WATASU_LIBVIRT_URI", "qemu:///system")
# The class behind `sandboxes.runtime.driver_for`. Not read from the environment: every
# installation drives libvirt; service tests swap in their fake (tests/fake_driver.py).
RUNTIME_DRIVER = "sandboxes.runtime.libvirt_driver.LibvirtDriver"
# kvm when the CPU has vmx/svm, else tcg (software emulation); "kvm"/"tcg" force it.
RUNTIME_ACCEL = env.choice("WATASU_ACCEL", "auto", ("auto", "kvm", "tcg"))
RUNTIME_HOST_NAME = env.str("WATASU_HOST_NAME", socket.gethostname())
RUNTIME_HOST_DATA_DIR = env.path("WATASU_HOST_DATA_DIR", str(DATA_DIR / "runtime"))
# --- Many hosts (sandboxes/hosts.py, docs/hosts.md) ------------------------------------
# The address the host's agent ports listen on and the edge connects to: loopback on one
# machine; a private address (never a public one: the agents' only check is their secret)
# when web processes on other machines reach this host.
RUNTIME_HOST_ADDRESS = env.str("WATASU_HOST_ADDRESS", "127.0.0.1")
# Set by `manage.py host_worker` (`make host`): this process is the worker of
# WATASU_HOST_NAME, and runs the steps of that host queued for it.
HOST_WORKER = env.bool("WATASU_HOST_WORKER", False)
# False for processes that must never drive a VM or touch a host's files themselves (web and
# sweep workers of a multi-host deployment): every host step then goes to the host's worker,
# and a host without one is refused.
RUNTIME_IN_PROCESS = env.bool("WATASU_RUNTIME_IN_PROCESS", True)
# How long a blocking call (create, resume, pause, a file operation) waits for a host's
# worker before answering 503 `host_unavailable`; a step still queued then is dropped.
HOST_CALL_TIMEOUT_SECONDS = env.int("WATASU_HOST_CALL_TIMEOUT_SECONDS", 120, min=1)
# A host worker writes its heartbeat this often; the hosts sweep marks a host whose last
# heartbeat is older than WATASU_HOST_DOWN_AFTER_SECONDS down (its sandboxes unreachable).
HOST_HEARTBEAT_SECONDS = env.int("WATASU_HOST_HEARTBEAT_SECONDS", 5, min=1)
HOST_DOWN_AFTER_SECONDS = env.int("WATASU_HOST_DOWN_AFTER_SECONDS", 20, min=2)
# Placement counts a host that already has the template version's files as this much
# freer (a start elsewhere first pulls them from the artifact store).
PLACEMENT_LOCAL_BONUS_MB = env.int("WATASU_PLACEMENT_LOCAL_BONUS_MB", 1024, min=0)
# Guests rarely use all their vCPUs: placement hands out cores x this many vCPUs.
RUNTIME_CPU_OVERCOMMIT = env.int("WATASU_CPU_OVERCOMMIT", 4, min=1, max=64)
RUNTIME_HOST_CPU_CAPACITY = env.int(
    "WATASU_HOST_CPU_CAPACITY", RUNTIME_CPU_OVERCOMMIT * (os.cpu_count() or 1), min=1
)
# The guest memory this host may hold, at most its RAM (a guest's RAM is real host RAM: an
# overcommitted host swaps or kills QEMU processes). WATASU_MEMORY_OVERCOMMIT_PERCENT lets
# placement go past it, guarded by the host's measured free memory.
RUNTIME_HOST_MEMORY_CAPACITY_MB = env.int(
    "WATASU_HOST_MEMORY_CAPACITY_MB", _host_memory_mb() * 3 // 4, min=256, max=_host_memory_mb()
)
RUNTIME_IMAGE_CACHE_DIR = env.path("WATASU_IMAGE_CACHE_DIR", str(CACHE_DIR / "images"))
RUNTIME_APT_MIRROR = env.str("WATASU_APT_MIRROR", "")  # empty: the host's configured mirror
# libvirt domain names are {prefix}{sandbox id}; reconciliation only touches this prefix,
# so each installation sharing a libvirt needs its own. The default is scoped to the data
# directory: `watasu-sbx-` for the standard one, `watasu-<hash of the path>-sbx-` for
# any other, so two `make run` with different data dirs never destroy each other's VMs.
DEFAULT_DATA_DIR = Path("/var/lib/watasu")
_INSTALLATION = hashlib.sha256(str(DATA_DIR).encode()).hexdigest()[:8]
RUNTIME_VM_PREFIX = env.str(
    "WATASU_VM_PREFIX", "watasu-sbx-" if DATA_DIR == DEFAULT_DATA_DIR else f"watasu-{_INSTALLATION}-sbx-"
)
# Each sandbox's QEMU runs as uid BASE + sandbox id (in the QEMU user's group), so one
# escaped QEMU cannot open another sandbox's disk; 0 runs every QEMU as the QEMU user.
# Warm pool VMs run as BASE + 1e9 + their id (sandboxes.models.POOL_UID_OFFSET), hence the max.
RUNTIME_QEMU_UID_BASE = env.int("WATASU_QEMU_UID_BASE", 1_000_000_000, min=0, max=3_000_000_000)
# --- Artifact store (templates_app/artifacts.py, docs/artifacts.md) -------------------
# Where template artifacts are shipped between hosts: `file:///path` (a directory, shared
# or local) or `s3://bucket/prefix` on any S3-compatible service (MinIO, Ceph, AWS).
ARTIFACT_STORE = env.str("WATASU_ARTIFACT_STORE", (DATA_DIR / "artifact-store").as_uri())
if not re.fullmatch(r"file:///\S*|s3://[^/\s]+(/\S*)?", ARTIFACT_STORE):
    raise ImproperlyConfigured(
        f"WATASU_ARTIFACT_STORE={ARTIFACT_STORE!r} is invalid: expected file:///path or s3://bucket/prefix."
    )
ARTIFACT_S3_ENDPOINT = env.str("WATASU_ARTIFACT_S3_ENDPOINT", "")  # empty: AWS's own endpoint
ARTIFACT_S3_REGION = env.str("WATASU_ARTIFACT_S3_REGION", "")
# The usual AWS names, so the same credentials work for the aws CLI and mc.
ARTIFACT_S3_ACCESS_KEY = env.str("AWS_ACCESS_KEY_ID", "")
ARTIFACT_S3_SECRET_KEY = env.str("AWS_SECRET_ACCESS_KEY", "")
# --- Warm pool and tiered pause (sandboxes/pool.py, docs/fast-starts.md) -----------------
# Clones of template snapshots restored ahead of time and held suspended, per (template
# version, shape, host). Off when QEMUs share one uid (a pooled VM's network policy is its
# uid's firewall rules, applied when a create takes it).
POOL_ENABLED = env.bool("WATASU_POOL_ENABLED", True)
# Kept warm for the `base` template's current version at its default shape on each up host.
POOL_BASE_SIZE = env.int("WATASU_POOL_BASE_SIZE", 2, min=0, max=1000)
# A (version, shape) created from within the window is kept warm: as many VMs as it had
# creates in the window, at most POOL_MAX_PER_SHAPE.
POOL_DEMAND_WINDOW_SECONDS = env.int("WATASU_POOL_DEMAND_WINDOW_SECONDS", 600, min=1)
POOL_MAX_PER_SHAPE = env.int("WATASU_POOL_MAX_PER_SHAPE", 8, min=0, max=1000)
# Guest memory all pooled VMs of one host may hold (they count against its capacity).
POOL_MAX_MEMORY_MB = env.int("WATASU_POOL_MAX_MEMORY_MB", 4096, min=0)
# Below this much measured free host memory the pool stops filling and releases VMs.
POOL_MIN_AVAILABLE_MB = env.int("WATASU_POOL_MIN_AVAILABLE_MB", 2048, min=0)
# VMs restored per pool sweep run (each ~0.5 s under TCG); the sweep requeues itself for more.
POOL_FILL_BATCH = env.int("WATASU_POOL_FILL_BATCH", 4, min=1, max=100)
# A pause suspends the VM in memory first (resume in milliseconds) and saves its memory to
# disk after this long, or at once under memory pressure (0: every pause goes to disk).
PAUSE_IN_MEMORY_SECONDS = env.int("WATASU_PAUSE_IN_MEMORY_SECONDS", 300, min=0)
# At most this many sandboxes of one team paused in memory; further pauses go to disk.
PAUSE_IN_MEMORY_PER_TEAM = env.int("WATASU_PAUSE_IN_MEMORY_PER_TEAM", 10, min=0)
# Memory overcommit: placement may hand out this percentage of a host's memory capacity
# (idle guests touch a fraction of their RAM, and page sharing merges what clones have in
# common), but never places while the host's measured free memory is below
# WATASU_HOST_MIN_AVAILABLE_MB.
RUNTIME_MEMORY_OVERCOMMIT_PERCENT = env.int("WATASU_MEMORY_OVERCOMMIT_PERCENT", 100, min=100, max=800)
HOST_MIN_AVAILABLE_MB = env.int("WATASU_HOST_MIN_AVAILABLE_MB", 1024, min=0)
# --- Network policies (sandboxes/runtime/egress, docs/network.md) ---------------------
# Refused to every guest whatever its policy (besides every address of the host itself).
EGRESS_DENY_NETS = env.list(
    "WATASU_EGRESS_DENY_NETS",
    [
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
    ],
)  # fmt: skip
# Off only for tests on the fake runtime: policies are then recorded, never enforced.
EGRESS_ENFORCE = env.bool("WATASU_EGRESS_ENFORCE", True)
EGRESS_DENY_PORTS = env.int_list("WATASU_EGRESS_DENY_PORTS", [25])
# Where the platform resolves names for guests ("a.b.c.d" or "a.b.c.d:port"); default: the
# host's own resolvers (/etc/resolv.conf).
EGRESS_RESOLVERS = env.list("WATASU_EGRESS_RESOLVERS", [])
EGRESS_PROXY_PORT = env.int("WATASU_EGRESS_PROXY_PORT", 15380, min=1024, max=65535)
EGRESS_DNS_PORT = env.int("WATASU_EGRESS_DNS_PORT", 15353, min=1024, max=65535)
EGRESS_RUN_DIR = env.path("WATASU_EGRESS_RUN_DIR", "/run/watasu/egress")
EGRESS_USER = env.str("WATASU_EGRESS_USER", "watasu-egress")
# The host's CA for header rules on HTTPS (one per host: guests of every installation trust it).
EGRESS_CA_DIR = env.path("WATASU_EGRESS_CA_DIR", "/var/lib/watasu-egress")
# Extra CA certificates the proxy trusts for the real hosts behind header rules.
EGRESS_UPSTREAM_CA_FILE = env.str("WATASU_EGRESS_UPSTREAM_CA_FILE", "")
# Named egress profiles: the hosts a profile grants. `package-registries` is what
# allow_package_registry_access grants.
EGRESS_PROFILES: dict[str, list[str]] = {
    "package-registries": [
        "pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "registry.yarnpkg.com",
        "deb.debian.org", "security.debian.org", "*.debian.org", "crates.io", "static.crates.io",
        "index.crates.io", "proxy.golang.org", "sum.golang.org", "rubygems.org", "repo.maven.apache.org",
        "github.com", "codeload.github.com", "objects.githubusercontent.com",
    ],
}  # fmt: skip
# Network classes a sandbox may ask for: the concurrent connections each allows (0: no
# limit). `SANDBOX_DEFAULT_NETWORK_CLASS` is the default.
NETWORK_CLASSES: dict[str, dict[str, int]] = {
    "standard": {"max_connections": 1024},
    "restricted": {"max_connections": 64},
}

# How long a resume waits for the restarted guest's agent before saving the VM again.
RUNTIME_RESUME_TIMEOUT_SECONDS = env.int("WATASU_RESUME_TIMEOUT_SECONDS", 60, min=1)

# --- Celery ----------------------------------------------------------------------

REDIS_URL = env.redis_url("REDIS_URL")
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celery-beat" / "schedule")
# Sweeps and template builds run on separate queues, served by separate worker
# processes (`make run` starts one of each), so an hour-long build never delays a
# timeout. Everything else (ping) stays on the default queue, with the sweeps.
CELERY_TASK_DEFAULT_QUEUE = "celery"
CELERY_QUEUE_SWEEPS, CELERY_QUEUE_BUILDS = "sweeps", "builds"
CELERY_TASK_ROUTES = {
    "sweeps.*": {"queue": CELERY_QUEUE_SWEEPS},
    "templates.*": {"queue": CELERY_QUEUE_BUILDS},
}
# The shared cache (rate-limit counters): Redis when configured, else per process.
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    if REDIS_URL
    else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
}
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    CELERY_RESULT_BACKEND = REDIS_URL
else:
    # Embedded: a broker made of files in the data directory, shared by the web
    # process, the worker and beat on one machine; no server to run.
    _broker_dir = DATA_DIR / "celery-broker"
    CELERY_BROKER_URL = "filesystem://localhost//"  # the host is never used; naming it keeps kombu quiet
    CELERY_BROKER_TRANSPORT = "watasu.broker:Transport"  # messages renamed into place whole
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        "polling_interval": 0.2,
    }
    CELERY_RESULT_BACKEND = f"file://{DATA_DIR / 'celery-results'}"

# --- sweeps: what keeps the platform's promises while nobody calls it ----------------------
# Every periodic job is here, run by Celery beat through the one task `sweeps.run`
# (registered by each app in watasu/sweeps.py). Each works in batches of SWEEP_BATCH_SIZE and queues itself
# again while a batch came back full; each message expires after its own interval, so
# a stalled worker never collects a backlog of the same sweep.
SWEEP_BATCH_SIZE = env.int("WATASU_SWEEP_BATCH_SIZE", 500, min=1)
SWEEP_DEADLINE_INTERVAL_SECONDS = env.int("WATASU_SWEEP_DEADLINE_INTERVAL_SECONDS", 2, min=1)
SWEEP_INTERVAL_SECONDS = {
    "deadlines": SWEEP_DEADLINE_INTERVAL_SECONDS,  # timeouts: expired / stopped within seconds
    "stuck": env.int("WATASU_SWEEP_STUCK_INTERVAL_SECONDS", 30, min=1),
    "reconcile": env.int("WATASU_SWEEP_RECONCILE_INTERVAL_SECONDS", 60, min=1),
    "hosts": env.int("WATASU_SWEEP_HOSTS_INTERVAL_SECONDS", 10, min=1),
    "builds": env.int("WATASU_SWEEP_BUILDS_INTERVAL_SECONDS", 30, min=1),
    "retention": env.int("WATASU_SWEEP_RETENTION_INTERVAL_SECONDS", 600, min=1),
    # Volumes whose sandbox is gone are released; every volume's storage is measured.
    "volumes": env.int("WATASU_SWEEP_VOLUMES_INTERVAL_SECONDS", 300, min=1),
    # Metering windows that ended are billed; suspension and alerts follow the balance.
    "billing": env.int("WATASU_SWEEP_BILLING_INTERVAL_SECONDS", 15, min=1),
    # Warm pools refilled and drained; pauses held in memory moved to disk when due.
    "pool": env.int("WATASU_SWEEP_POOL_INTERVAL_SECONDS", 10, min=1),
}
# A sandbox still creating/restoring/stopping/checkpointing after this is reconciled
# against libvirt (the process doing it died).
SWEEP_STUCK_AFTER_SECONDS = env.int("WATASU_SWEEP_STUCK_AFTER_SECONDS", 300, min=1)
# Failed and lost sandboxes keep their disk this long for inspection.
SANDBOX_DISK_RETENTION_SECONDS = env.int("WATASU_SANDBOX_DISK_RETENTION_SECONDS", 86400, min=0)
# Build cache layers nobody used for this long are evicted (leaves first).
BUILD_LAYER_RETENTION_SECONDS = env.int("WATASU_BUILD_LAYER_RETENTION_SECONDS", 7 * 86400, min=0)
# Files no row or domain claims are deleted once older than this (never a file in use).
ORPHAN_FILE_GRACE_SECONDS = env.int("WATASU_ORPHAN_FILE_GRACE_SECONDS", 600, min=0)

CELERY_BEAT_SCHEDULE: dict[str, dict[str, object]] = {
    f"sweep-{name}": {
        "task": "sweeps.run",
        "schedule": float(seconds),
        "args": [name],
        "options": {"expires": float(seconds)},
    }
    for name, seconds in SWEEP_INTERVAL_SECONDS.items()
}

# --- Mail (billing alerts; later the dashboard's invitations and resets) -------------
# The embedded default prints mail to the worker's log; set an SMTP host for real mail.
_MAIL_BACKEND = env.str("WATASU_EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
_MAIL_OPTIONS = {
    "host": env.str("WATASU_EMAIL_HOST", "localhost"),
    "port": env.int("WATASU_EMAIL_PORT", 25, min=1, max=65535),
    "username": env.str("WATASU_EMAIL_HOST_USER", ""),
    "password": env.str("WATASU_EMAIL_HOST_PASSWORD", ""),
    "use_tls": env.bool("WATASU_EMAIL_USE_TLS", False),
    "timeout": env.int("WATASU_EMAIL_TIMEOUT_SECONDS", 10, min=1),
}
DEFAULT_FROM_EMAIL = env.str("WATASU_EMAIL_FROM", "watasu@localhost")
if django.VERSION >= (6, 1):
    _smtp = _MAIL_BACKEND.endswith("smtp.EmailBackend")
    MAILERS = {"default": {"BACKEND": _MAIL_BACKEND, "OPTIONS": _MAIL_OPTIONS if _smtp else {}}}
else:  # Django 5.2 (an older Python) still reads the EMAIL_* settings
    EMAIL_BACKEND = _MAIL_BACKEND
    EMAIL_HOST, EMAIL_PORT = _MAIL_OPTIONS["host"], _MAIL_OPTIONS["port"]
    EMAIL_HOST_USER, EMAIL_HOST_PASSWORD = _MAIL_OPTIONS["username"], _MAIL_OPTIONS["password"]
    EMAIL_USE_TLS, EMAIL_TIMEOUT = _MAIL_OPTIONS["use_tls"], _MAIL_OPTIONS["timeout"]

# --- Dashboard (the team web UI at /dashboard/) ----------------------------------------
# Anyone may sign up (and gets a personal team) when open; otherwise only invited people
# and accounts an operator creates. Open by default only in the embedded deployment.
SIGNUP_OPEN = env.bool("WATASU_SIGNUP_OPEN", DEPLOYMENT == "embedded")
# Sign-in attempts allowed per email and per client address in a window, then refused.
SIGNIN_ATTEMPTS = env.int("WATASU_SIGNIN_ATTEMPTS", 10, min=1)
SIGNIN_WINDOW_SECONDS = env.int("WATASU_SIGNIN_WINDOW_SECONDS", 900, min=1)
# How long an invitation to a team may be accepted.
INVITATION_TTL_SECONDS = env.int("WATASU_INVITATION_TTL_SECONDS", 7 * 86400, min=60)
# The browser terminal's data-plane ticket: how long it may be used to open the socket.
DASHBOARD_TICKET_SECONDS = env.int("WATASU_DASHBOARD_TICKET_SECONDS", 60, min=5)
# Where the top-up page loads Stripe.js from (tests point it at localstripe's stand-in).
STRIPE_JS_URL = env.str("WATASU_STRIPE_JS_URL", "https://js.stripe.com/v3/")
LOGIN_URL = "dashboard:sign-in"
LOGIN_REDIRECT_URL = "dashboard:home"
LOGOUT_REDIRECT_URL = "dashboard:sign-in"
# Cookies: HttpOnly session, SameSite=Lax, and Secure whenever the public URL is HTTPS.
_https = PUBLIC_URL.startswith("https://")
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = _https
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = CSRF_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_AGE = env.int("WATASU_SESSION_SECONDS", 14 * 86400, min=300)
CSRF_TRUSTED_ORIGINS = [PUBLIC_URL]
if _https:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
