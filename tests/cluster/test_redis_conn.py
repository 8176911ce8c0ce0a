"""Connecting from RedisSettings (BatchConfig.redis()): URL, password from the env, TLS, and a one-line
error when Redis is away."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import time

import pytest

from bark_serve.cluster.ports import free_port
from bark_serve.cluster.redis_conn import (
    RedisSettings,
    RedisUnavailable,
    aconnect,
    connect,
    connection_kwargs,
    redacted,
    resolve_url,
)
from bark_serve.serving.config import BatchConfig
from tests.cluster.redis_server import RedisServer


def test_url_resolution_and_config_errors(tmp_path):
    assert resolve_url(RedisSettings(redis_url="redis://a:1/0"), env={"REDIS_URL": "redis://b:2/0"}) == "redis://a:1/0"
    assert resolve_url(RedisSettings(), env={"REDIS_URL": "redis://b:2/0"}) == "redis://b:2/0"
    with pytest.raises(RedisUnavailable, match="set batch.redis_url or the REDIS_URL"):
        resolve_url(RedisSettings(), env={})
    with pytest.raises(RedisUnavailable, match="must start with redis://"):
        resolve_url(RedisSettings(redis_url="http://x"), env={})
    cfg = RedisSettings(redis_url="redis://h:1/0", redis_password_env="BARK_REDIS_PASSWORD")
    with pytest.raises(RedisUnavailable, match="BARK_REDIS_PASSWORD"):
        connection_kwargs(cfg, env={})
    assert connection_kwargs(cfg, env={"BARK_REDIS_PASSWORD": "s3cret"})[1]["password"] == "s3cret"
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(RedisUnavailable, match="not rediss://"):
        connection_kwargs(RedisSettings(redis_url="redis://h:1", redis_tls_ca_file=str(ca)), env={})
    with pytest.raises(RedisUnavailable, match="does not exist"):
        connection_kwargs(RedisSettings(redis_url="rediss://h:1", redis_tls_ca_file=str(tmp_path / "no.pem")), env={})
    assert connection_kwargs(RedisSettings(redis_url="rediss://h:1", redis_tls_ca_file=str(ca)), env={})[1][
        "ssl_ca_certs"] == str(ca)
    assert redacted("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"


def test_unreachable_redis_is_one_clear_line():
    port = free_port()
    cfg = RedisSettings(redis_url=f"redis://127.0.0.1:{port}/0")
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable) as info:
        connect(cfg, env={})
    assert time.monotonic() - t0 < 10
    message = str(info.value)
    assert message.startswith(f"cannot reach Redis at 127.0.0.1:{port}") and "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(RedisUnavailable, match="cannot reach Redis"):
        asyncio.run(aconnect(cfg, env={}))


def test_password_from_env(tmp_path):
    server = RedisServer(tmp_path, extra_args=("--requirepass", "s3cret"), client_kwargs={"password": "s3cret"}).start()
    try:
        cfg = RedisSettings(redis_url=server.url, redis_password_env="BARK_REDIS_PASSWORD")
        assert connect(cfg, env={"BARK_REDIS_PASSWORD": "s3cret"}).ping()
        with pytest.raises(RedisUnavailable, match="cannot reach Redis"):
            connect(cfg, env={"BARK_REDIS_PASSWORD": "wrong"})
        with pytest.raises(RedisUnavailable):
            connect(RedisSettings(redis_url=server.url), env={})  # no password
    finally:
        server.stop()


def _make_certs(folder):
    """A CA and a server certificate for 127.0.0.1, signed by it (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("bark test CA")).issuer_name(name("bark test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(cert.public_bytes(pem))
    (folder / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


def test_tls_with_ca_file(tmp_path):
    ca, cert, key = _make_certs(tmp_path)
    tls = ("--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
           "--tls-auth-clients", "no")
    server = RedisServer(tmp_path / "redis", extra_args=tls, scheme="rediss",
                         client_kwargs={"ssl_ca_certs": str(ca)}).start()
    try:
        assert connect(RedisSettings(redis_url=server.url, redis_tls_ca_file=str(ca)), env={}).ping()
        assert asyncio.run(_aping(RedisSettings(redis_url=server.url, redis_tls_ca_file=str(ca))))
        with pytest.raises(RedisUnavailable, match="cannot reach Redis"):  # an unknown CA is refused
            connect(RedisSettings(redis_url=server.url), env={})
    finally:
        server.stop()


async def _aping(cfg):
    client = await aconnect(cfg, env={})
    try:
        return await client.ping()
    finally:
        await client.aclose()


def test_open_store_and_queue_from_config(redis_server):
    from bark_serve.cluster.batch_types import BatchKeys
    from bark_serve.cluster.jobs import open_store
    from bark_serve.cluster.queue import open_queue

    cfg = BatchConfig(enabled=True, redis_url=redis_server.url, max_attempts=5, result_ttl_s=600,
                      inline_results_max_fraction=0.25)
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="inline_results_max_fraction"):
            BatchConfig(inline_results_max_fraction=bad)

    async def main():
        keys = BatchKeys("cfgtest")
        store, queue = await open_store(cfg, keys), await open_queue(cfg, keys)
        assert (store.ttl, queue.max_attempts, queue.ttl, queue.results_dir) == (600, 5, 600, None)
        assert (queue.inline_max, queue.inline_fraction) == (256 * 1024, 0.25)
        assert await store.redis.ping() and await queue.backlog() == (0, 0)
        await store.redis.aclose()
        await queue.redis.aclose()
    asyncio.run(main())
    with pytest.raises(RedisUnavailable):
        asyncio.run(open_store(BatchConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0")))
