"""Connect to the batch-job Redis from :class:`RedisSettings` (serving's ``BatchConfig.redis()``).

The URL is ``batch.redis_url``, else the ``REDIS_URL`` environment variable
(read when connecting, never at import). The password comes from the
environment variable named by ``batch.redis_password_env`` (a Kubernetes
Secret), so it never sits in the config file; ``rediss://`` turns on TLS,
verified against ``batch.redis_tls_ca_file`` when given. Every problem
surfaces as :class:`RedisUnavailable` with a one-line message, which the CLI
and the app print without a stack trace.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis

CONNECT_TIMEOUT_S = 5.0
# Longer than any blocking stream read we issue (those block for at most a few seconds).
SOCKET_TIMEOUT_S = 30.0

# What these clients read: bytes (decode_responses=False) in RESP2 shapes (redis-py's default legacy_responses).
# redis-py annotates a reply for every setting (bytes | str, RESP2 lists or RESP3 dicts), so the cluster modules
# cast the replies they read to what they are; the stream replies' shapes:
StreamEntry = tuple[bytes, dict[bytes, bytes]]  # (entry id, fields): XRANGE, XREVRANGE
StreamRead = list[tuple[bytes, list[StreamEntry]]]  # [(stream, entries)]: XREAD, XREADGROUP


@dataclass(frozen=True)
class RedisSettings:
    """Where the batch-job Redis is and how to log in (field names as in the ``batch:`` config)."""

    redis_url: str | None = None
    redis_url_env: str | None = None  # env var holding the whole URL; beats redis_url
    redis_password_env: str | None = None  # env var holding the password
    redis_tls_ca_file: str | None = None


class RedisUnavailable(RuntimeError):
    """Redis is not configured correctly or cannot be reached (one-line message)."""


def redacted(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def resolve_url(cfg: RedisSettings, env: Mapping[str, str] | None = None) -> str:
    """``$<redis_url_env>``, else ``cfg.redis_url``, else ``$REDIS_URL``; RedisUnavailable if none or malformed."""
    env = os.environ if env is None else env
    url = (env.get(cfg.redis_url_env) if cfg.redis_url_env else None) or cfg.redis_url or env.get("REDIS_URL")
    if not url:
        raise RedisUnavailable("batch jobs need Redis: set batch.redis_url or the REDIS_URL environment variable")
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise RedisUnavailable(f"batch.redis_url must start with redis://, rediss:// or unix://, got {redacted(url)!r}")
    return url


def connection_kwargs(cfg: RedisSettings, env: Mapping[str, str] | None = None) -> tuple[str, dict]:
    """The URL and keyword arguments of ``Redis.from_url`` (password from the env, TLS options)."""
    env = os.environ if env is None else env
    url = resolve_url(cfg, env)
    kwargs: dict = {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_timeout": SOCKET_TIMEOUT_S,
                    "health_check_interval": 30, "decode_responses": False}
    if cfg.redis_password_env:
        password = env.get(cfg.redis_password_env)
        if password is None:
            raise RedisUnavailable(f"batch.redis_password_env names {cfg.redis_password_env!r}, "
                                   "but that environment variable is not set")
        kwargs["password"] = password
    tls = urlsplit(url).scheme == "rediss"
    if cfg.redis_tls_ca_file:
        if not tls:
            raise RedisUnavailable("batch.redis_tls_ca_file is set but the Redis URL is not rediss:// (TLS)")
        if not os.path.isfile(cfg.redis_tls_ca_file):
            raise RedisUnavailable(f"batch.redis_tls_ca_file {cfg.redis_tls_ca_file!r} does not exist")
        kwargs["ssl_ca_certs"] = cfg.redis_tls_ca_file
    if tls:
        kwargs["ssl_cert_reqs"] = "required"
    return url, kwargs


def sync_client(cfg: RedisSettings, env: Mapping[str, str] | None = None) -> redis.Redis:
    """A blocking client (not yet connected: see :func:`ping`)."""
    url, kwargs = connection_kwargs(cfg, env)
    return redis.Redis.from_url(url, **kwargs)


def async_client(cfg: RedisSettings, env: Mapping[str, str] | None = None) -> aioredis.Redis:
    """An asyncio client; create it inside the event loop that will use it."""
    url, kwargs = connection_kwargs(cfg, env)
    return aioredis.Redis.from_url(url, **kwargs)


def _describe(client: redis.Redis | aioredis.Redis, exc: Exception) -> str:
    kw = client.connection_pool.connection_kwargs
    where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot reach Redis at {where}: {reason}"


def ping(client: redis.Redis) -> None:
    """Check the connection once; RedisUnavailable (one line) if Redis does not answer."""
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise RedisUnavailable(_describe(client, exc)) from None


async def aping(client: aioredis.Redis) -> None:
    """Asyncio twin of :func:`ping`."""
    try:
        await client.ping()
    except (redis.RedisError, OSError) as exc:
        raise RedisUnavailable(_describe(client, exc)) from None


def connect(cfg: RedisSettings, env: Mapping[str, str] | None = None) -> redis.Redis:
    """A blocking client that answered PING (the startup check)."""
    client = sync_client(cfg, env)
    ping(client)
    return client


async def aconnect(cfg: RedisSettings, env: Mapping[str, str] | None = None) -> aioredis.Redis:
    """An asyncio client that answered PING."""
    client = async_client(cfg, env)
    try:
        await aping(client)
    except RedisUnavailable:
        await client.aclose()
        raise
    return client
