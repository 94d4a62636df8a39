"""Reads the environment once into a frozen `Settings`; the only module that touches os.environ."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from worker.errors import ConfigurationError

VAR_DIR = Path("var")


@dataclass(frozen=True, repr=False)
class Settings:
    """Everything the service reads from its environment, validated.

    Its repr (and str) masks every password, so no log line, error or banner that prints the
    settings can show one.
    """

    database_url: str
    broker_url: str
    result_backend: str | None
    visibility_timeout: int
    sql_echo: bool
    flower_basic_auth: str | None
    max_retries: int
    retry_backoff_max: int
    task_time_limit: int
    log_format: str
    group_commit: bool = True
    #: The Redis master's name that a sentinel:// broker asks its sentinels for.
    broker_master_name: str | None = None
    #: OpenTelemetry tracing (the `otel` extra); exporters from the standard OTEL_* variables.
    tracing: bool = False
    #: The port a worker serves Prometheus metrics on (None: no metrics server).
    metrics_port: int | None = None

    @property
    def embedded(self) -> bool:
        """True when the database is the server-less SQLite default."""
        return self.database_url.startswith("sqlite")

    def __repr__(self) -> str:
        shown = {field.name: getattr(self, field.name) for field in fields(self)}
        for name in ("database_url", "broker_url", "result_backend"):
            shown[name] = mask_url(shown[name]) or shown[name]
        if self.flower_basic_auth:
            # Flower takes a comma-separated list of user:password pairs.
            users = (pair.partition(":")[0] for pair in self.flower_basic_auth.split(","))
            shown["flower_basic_auth"] = ",".join(f"{user}:***" for user in users)
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in shown.items())})"


def _integer(environ: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum}, got {value}")
    return value


def _flag(environ: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigurationError(f"{name} must be 1 or 0, got {raw!r}")


def normalize_database_url(raw: str) -> str:
    """Select psycopg2 for plain postgresql:// URLs (SQLAlchemy 2.1 would pick psycopg 3)."""
    scheme, sep, rest = raw.partition("://")
    if not sep:
        raise ConfigurationError("DATABASE_URL must look like postgresql://user@host/database")
    if scheme in ("postgres", "postgresql"):
        scheme = "postgresql+psycopg2"
    if scheme.split("+")[0] not in ("postgresql", "sqlite"):
        raise ConfigurationError(
            f"DATABASE_URL must be a postgresql:// or sqlite:// URL, got {scheme}://"
        )
    return f"{scheme}://{rest}"


def load_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """Build the settings from an environment mapping, failing fast on a bad value."""
    database_url = (
        environ.get("DATABASE_URL", "").strip() or f"sqlite:///{VAR_DIR}/writing-sessions.db"
    )
    broker_url = (
        environ.get("CELERY_BROKER_URL", "").strip() or f"sqla+sqlite:///{VAR_DIR}/broker.db"
    )
    result_backend = environ.get("CELERY_RESULT_BACKEND", "").strip()
    if not result_backend and "CELERY_BROKER_URL" not in environ:
        result_backend = f"db+sqlite:///{VAR_DIR}/results.db"
    log_format = environ.get("LOG_FORMAT", "text").strip().lower() or "text"
    if log_format not in ("text", "json"):
        raise ConfigurationError(f"LOG_FORMAT must be text or json, got {log_format!r}")
    visibility_timeout = _integer(environ, "CELERY_VISIBILITY_TIMEOUT", 3600, minimum=2)
    master_name = sentinel_master(
        broker_url, environ.get("CELERY_BROKER_MASTER_NAME", "").strip() or None
    )
    return Settings(
        database_url=normalize_database_url(database_url),
        broker_url=broker_url,
        broker_master_name=master_name,
        result_backend=result_backend or None,
        visibility_timeout=visibility_timeout,
        sql_echo=_flag(environ, "SQL_ECHO"),
        flower_basic_auth=environ.get("FLOWER_BASIC_AUTH", "").strip() or None,
        max_retries=_integer(environ, "WRITING_SESSIONS_MAX_RETRIES", 10, minimum=0),
        retry_backoff_max=_integer(environ, "WRITING_SESSIONS_RETRY_BACKOFF_MAX", 120, minimum=1),
        task_time_limit=_integer(environ, "WRITING_SESSIONS_TASK_TIME_LIMIT", 300, minimum=1),
        log_format=log_format,
        group_commit=_flag(environ, "WRITING_SESSIONS_GROUP_COMMIT", default=True),
        tracing=_flag(environ, "WRITING_SESSIONS_TRACING"),
        metrics_port=_integer(environ, "WRITING_SESSIONS_METRICS_PORT", 0, minimum=0) or None,
    )


def sentinel_master(broker_url: str, setting: str | None) -> str | None:
    """The Redis master's name that a sentinel:// broker URL needs, if it is one.

    From CELERY_BROKER_MASTER_NAME or, failing that, `?master_name=` on any of the URL's
    sentinels (`sentinel://h1:26379;sentinel://h2:26379?master_name=mymaster`).
    """
    if not broker_url.startswith("sentinel://"):
        return setting
    named = [
        pair.partition("=")[2]
        for url in broker_url.split(";")
        for pair in urlsplit(url).query.split("&")
        if pair.startswith("master_name=")
    ]
    name = setting or next((name for name in named if name), None)
    if not name:
        raise ConfigurationError(
            "a sentinel:// CELERY_BROKER_URL needs the Redis master's name: set "
            "CELERY_BROKER_MASTER_NAME, or add ?master_name=<name> to the URL"
        )
    return name


def mask_url(url: str | None) -> str:
    """Return the URL with any password replaced by ***, safe for logs and banners.

    Several URLs separated by `;` (Sentinel's, kombu's failover list) are each masked.
    """
    if not url:
        return ""
    if ";" in url:
        return ";".join(mask_url(part) or part for part in url.split(";"))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


settings = load_settings()
