"""Settings, read from ``VECTA_*`` environment variables (pydantic-settings).

Local state (database file, object-store folder, key files, logs, mail folder) lives under ``VECTA_HOME`` so two
instances with different homes never collide. In development, missing secrets are generated once and kept in
``VECTA_HOME/secrets`` (mode 0600); with ``VECTA_ENV=production`` they must be given explicitly and strong.
"""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path.home() / ".vecta"
_MIN_SECRET_LEN = 32


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VECTA_", extra="ignore")

    env: Literal["development", "test", "production"] = "development"
    home: Path = DEFAULT_HOME
    public_url: str = "http://127.0.0.1:8080"

    # Storage and queues. Empty means "the embedded default under VECTA_HOME".
    database_url: str = ""
    redis_url: str = ""
    broker_url: str = ""
    database_pool_size: int = 10

    # Secrets. Empty means "generated and kept under VECTA_HOME/secrets" (development and test only).
    secret_key: SecretStr = SecretStr("")
    api_key_pepper: SecretStr = SecretStr("")

    # Sessions and identity.
    access_token_ttl_seconds: int = Field(900, ge=30)
    refresh_token_ttl_seconds: int = Field(30 * 24 * 3600, ge=60)
    email_token_ttl_seconds: int = Field(24 * 3600, ge=60)
    invitation_ttl_seconds: int = Field(7 * 24 * 3600, ge=60)
    password_min_length: int = Field(10, ge=8)
    login_max_failures: int = Field(5, ge=1)
    login_lockout_seconds: int = Field(900, ge=1)
    auth_cache_ttl_seconds: float = Field(1.0, ge=0, le=1.0)
    last_used_flush_seconds: float = Field(5.0, gt=0)

    # Email.
    email_backend: Literal["file", "smtp"] = "file"
    email_from: str = "Vecta <no-reply@vecta.local>"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_username: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_starttls: bool = False
    smtp_timeout_seconds: float = 10.0

    # Clusters and the data plane.
    provisioner: Literal["local", "kubernetes"] = "local"
    k8s_namespace: str = "vecta-tenants"
    k8s_engine_image: str = "vecta:latest"
    k8s_memory_per_cu_gib: int = Field(4, ge=1)
    k8s_storage_per_cu_gib: int = Field(20, ge=1)
    k8s_storage_class: str = ""
    object_store_uri: str = ""  # s3://bucket/prefix or file:///path; empty: file://$VECTA_HOME/objects
    local_memory_per_cu_gib: int = Field(8, ge=1)
    local_spare_engines: int = Field(1, ge=0, le=8)  # warm `vecta engine spare` processes per worker
    max_cu_size: int = Field(16, ge=1)
    reconcile_interval_seconds: float = Field(10.0, gt=0)
    key_check_interval_seconds: float = Field(
        300.0, gt=0, description="how often every encryption key's state is checked (revocation, its end)"
    )
    engine_start_timeout_seconds: float = Field(60.0, gt=0)
    deleted_retention_days: int = Field(7, ge=0)
    dataplane_max_body_bytes: int = Field(64 << 20, ge=1024)
    dataplane_rate_per_key: float = Field(200.0, gt=0, description="requests per second per API key")
    dataplane_rate_per_cluster: float = Field(1000.0, gt=0, description="requests per second per cluster")
    dataplane_timeout_seconds: float = Field(30.0, gt=0)
    dataplane_fast_lane: bool = Field(True, description="serve cached, plain reads from uvicorn's parser callbacks")

    # Celery. ``eager`` runs tasks inline (only for unit tests of task bodies).
    celery_eager: bool = False

    # Logging.
    log_level: str = "INFO"
    log_json: bool = False

    @model_validator(mode="after")
    def _production_secrets(self) -> Settings:
        if self.env == "production":
            for name in ("secret_key", "api_key_pepper"):
                value = getattr(self, name).get_secret_value()
                if len(value) < _MIN_SECRET_LEN:
                    raise ValueError(
                        f"VECTA_{name.upper()} must be set to a random value of at least {_MIN_SECRET_LEN} "
                        "characters when VECTA_ENV=production"
                    )
            if not self.database_url:
                raise ValueError("VECTA_DATABASE_URL must be set when VECTA_ENV=production")
        return self

    # Derived locations -------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def secrets_dir(self) -> Path:
        return self.home / "secrets"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def mail_dir(self) -> Path:
        return self.home / "mail"

    @property
    def objects_uri(self) -> str:
        return self.object_store_uri or (self.home / "objects").resolve().as_uri()

    @property
    def async_database_url(self) -> str:
        url = self.database_url or f"sqlite+aiosqlite:///{self.home / 'vecta.db'}"
        return to_async_url(url)

    @property
    def sync_database_url(self) -> str:
        return to_sync_url(self.async_database_url)

    @property
    def celery_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        if self.redis_url:
            return self.redis_url
        return f"sqla+sqlite:///{self.home / 'broker.db'}"

    def secret(self, name: Literal["secret_key", "api_key_pepper"]) -> str:
        value: str = getattr(self, name).get_secret_value()
        if value:
            return value
        return _local_secret(self.secrets_dir, name)

    def ensure_home(self) -> None:
        for d in (self.home, self.data_dir, self.secrets_dir, self.log_dir, self.mail_dir):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.secrets_dir, 0o700)


def to_async_url(url: str) -> str:
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url.removeprefix("sqlite:///")
    for prefix in ("postgresql://", "postgres://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def to_sync_url(url: str) -> str:
    if url.startswith("sqlite+aiosqlite:///"):
        return "sqlite:///" + url.removeprefix("sqlite+aiosqlite:///")
    return url  # postgresql+psycopg works for both sync and async engines


@lru_cache(maxsize=16)
def _local_secret(directory: Path, name: str) -> str:
    path = directory / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_urlsafe(48)
    # O_EXCL: if two processes race, one wins and the other reads the winner's value.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    get_settings.cache_clear()
