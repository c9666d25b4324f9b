"""The secure local setup, for real: a second broker with a SASL_SSL (SCRAM-SHA-512) listener and a second
redis-server with TLS + requirepass, both started by ``slidr up`` on free ports with certificates made here by
``deploy/local/certs.sh``; clients and a real ``slidr worker`` go through them with Settings-built credentials
read from files, and no password shows in any output or log."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from schemas.events import Click, decode_decision
from slidr import services
from slidr.settings import Settings
from slidr.topics import Topics
from stream import cache, toymodel
from stream import features as F
from stream.app import read_feature_log
from stream.billing import ledger_of
from tests.stream import kafka_helpers as K
from tests.stream.helpers import traffic

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together while picked, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Secure:
    settings: Settings  # client settings: SASL_SSL + rediss://, secrets from files
    env: dict[str, str]  # the same for slidr processes
    kafka_password: str
    redis_password: str
    root: Path
    up_output: str


def _slidr(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slidr", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    root = tmp_path_factory.mktemp("secure")
    certs = root / "certs"
    made = subprocess.run(["bash", str(ROOT / "deploy/local/certs.sh"), str(certs)], capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    kpw, rpw = f"k-{uuid.uuid4().hex}", f"r-{uuid.uuid4().hex}"
    for name, pw in (("kafka.pw", kpw), ("redis.pw", rpw)):
        (root / name).write_text(pw + "\n")
        (root / name).chmod(0o600)
    plain, controller, sasl, tls = free_ports(4)
    cfg = {
        "home": root / "home", "cache_dir": ROOT / ".cache", "kafka_heap": "-Xmx512m -Xms256m",
        "kafka_bootstrap": f"127.0.0.1:{sasl}", "kafka_plaintext_port": plain, "kafka_controller_port": controller,
        "kafka_sasl_ssl_port": sasl, "kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "slidr", "kafka_sasl_password_file": root / "kafka.pw",
        "kafka_ssl_cafile": certs / "ca.crt", "certs_dir": certs,
        "redis_url": f"rediss://127.0.0.1:{tls}/0", "redis_password_file": root / "redis.pw",
        "redis_tls_cafile": certs / "ca.crt",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDR_")}
    env.update({f"SLIDR_{k.upper()}": str(v) for k, v in cfg.items()})
    s = Settings(_env_file=None, **cfg)
    try:
        up = _slidr(env, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        yield Secure(s, env, kpw, rpw, root, up.stdout + up.stderr)
    finally:
        down = _slidr(env, "down")
        assert down.returncode == 0, down.stderr
        for port in (plain, controller, sasl, tls):
            assert not services.port_open(port), f"port {port} still open after slidr down"


def test_settings_read_secrets_from_files_and_never_show_them(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file\nignored second line\n")
    s = Settings(_env_file=None, kafka_sasl_password_file=tmp_path / "pw",
                 redis_url="redis://:in-the-url@127.0.0.1:1/0")
    assert s.kafka_sasl_password is not None and s.kafka_sasl_password.get_secret_value() == "from-file"
    assert s.redis_secret() == "in-the-url"
    assert s.redis_url_redacted == "redis://:***@127.0.0.1:1/0"
    for text in (repr(s), str(s)):
        assert "from-file" not in text and "in-the-url" not in text
    direct = Settings(_env_file=None, kafka_sasl_password="direct",
                      kafka_sasl_password_file=tmp_path / "pw")
    assert direct.kafka_sasl_password is not None and direct.kafka_sasl_password.get_secret_value() == "direct"
    with pytest.raises(ValueError, match="cannot read the secret file") as err:
        Settings(_env_file=None, redis_password_file=tmp_path / "missing",
                 kafka_sasl_password="not-in-errors", redis_url="redis://:nor-this@h:1/0")
    assert "not-in-errors" not in str(err.value) and "nor-this" not in str(err.value)


def test_certs_are_made_once_and_verify(tmp_path: Path) -> None:
    run = ["bash", str(ROOT / "deploy/local/certs.sh"), str(tmp_path / "c")]
    first = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    crt = (tmp_path / "c" / "server.crt").read_bytes()
    again = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "valid" in again.stderr
    assert (tmp_path / "c" / "server.crt").read_bytes() == crt  # kept, not made again
    for key in ("ca.key", "server.key", "server.pem"):
        assert (tmp_path / "c" / key).stat().st_mode & 0o077 == 0, f"{key} readable by others"
    ok = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "c" / "ca.crt"),
                         str(tmp_path / "c" / "server.crt")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_kafka_sasl_ssl_round_trip_and_bad_credentials_refused(secure: Secure) -> None:
    s = secure.settings.model_copy(update={"topic_prefix": f"t-sec-{uuid.uuid4().hex[:8]}"})
    services.create_topics(s)
    topic = Topics(s.topic_prefix).clicks
    sent = [f"record-{i}".encode() for i in range(200)]

    async def round_trip() -> list[bytes]:
        prod = AIOKafkaProducer(**s.kafka_client_kwargs(), acks="all")
        await prod.start()
        try:
            await asyncio.gather(*[await prod.send(topic, v, partition=i % s.partitions) for i, v in enumerate(sent)])
        finally:
            await prod.stop()
        cons = AIOKafkaConsumer(**s.kafka_client_kwargs(), group_id=None, enable_auto_commit=False)
        await cons.start()
        got: list[bytes] = []
        try:
            tps = [TopicPartition(topic, p) for p in range(s.partitions)]
            cons.assign(tps)
            await cons.seek_to_beginning(*tps)
            while len(got) < len(sent):
                batch = await asyncio.wait_for(cons.getmany(timeout_ms=500), 30)
                got += [m.value for msgs in batch.values() for m in msgs if m.value is not None]
        finally:
            await cons.stop()
        return got

    assert sorted(asyncio.run(round_trip())) == sorted(sent)

    async def connect(bad: Settings) -> None:
        prod = AIOKafkaProducer(**bad.kafka_client_kwargs(), request_timeout_ms=5000)
        try:
            await asyncio.wait_for(prod.start(), 30)
        finally:
            await prod.stop()

    wrong_password = s.model_copy(update={"kafka_sasl_password": SecretStr("wrong")})
    with pytest.raises(KafkaError):
        asyncio.run(connect(wrong_password))
    untrusted = s.model_copy(update={"kafka_ssl_cafile": None})  # the system CAs did not sign the broker's cert
    with pytest.raises(KafkaError):
        asyncio.run(connect(untrusted))


def test_redis_tls_and_password(secure: Secure) -> None:
    s = secure.settings
    r = redis.Redis.from_url(s.redis_url, socket_timeout=5, **s.redis_kwargs())
    key = f"t-sec-{uuid.uuid4().hex[:8]}:k"
    assert r.set(key, b"v", ex=60) and r.get(key) == b"v"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(s.redis_url, socket_timeout=5, password="wrong",
                             ssl_ca_certs=str(s.redis_tls_cafile)).ping()
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):  # plain text to the TLS port
        redis.Redis(host="127.0.0.1", port=s.redis_port, socket_timeout=3,
                    password=secure.redis_password).ping()
    assert services.redis_ports(s) == {"tls": s.redis_port}  # no plain port in TLS mode
    conf = s.home / "redis" / "secure.conf"
    assert conf.stat().st_mode & 0o077 == 0


def test_status_and_service_logs_hold_no_secret(secure: Secure) -> None:
    st = _slidr(secure.env, "status", timeout=60)
    assert st.returncode == 0, st.stdout + st.stderr
    assert f"sasl_ssl=127.0.0.1:{secure.settings.kafka_sasl_ssl_port}" in st.stdout
    assert f"url=rediss://127.0.0.1:{secure.settings.redis_port}/0" in st.stdout
    assert st.stdout.count("(started by this instance)") == 2
    texts = {"slidr status": st.stdout + st.stderr, "slidr up": secure.up_output}
    home = secure.settings.home
    for f in [*home.glob("kafka/logs/*"), home / "kafka" / "server.properties", home / "redis" / "redis.log"]:
        texts[str(f)] = f.read_text(errors="replace")
    for where, text in texts.items():
        assert secure.kafka_password not in text and secure.redis_password not in text, where


def _profiles(clicks: list[Click]) -> dict[str, bytes]:
    cust = sorted({c.customer_id for c in clicks if c.customer_id})
    return F.build_profiles(
        [{"customer_id": k, "rfm_score": (i % 10) / 10, "account_age_days": 30 + i} for i, k in enumerate(cust)],
        [{"prefix": F.ip_range_key(c.ip)[4:], "datacenter": True} for c in clicks[:50]],
    )


def test_worker_through_sasl_ssl_and_redis_tls(secure: Secure, tmp_path: Path) -> None:
    prefix = f"t-sec-worker-{uuid.uuid4().hex[:8]}"
    s = secure.settings.model_copy(update={
        "topic_prefix": prefix, "worker_id": f"{prefix}-group", "redis_key_prefix": prefix,
        "home": tmp_path / "home", "registry_path": tmp_path / "registry", "worker_web_port": 0,
    })
    t = Topics(prefix)
    services.create_topics(s)
    toymodel.build_registry(s.registry_path, version="toy-sec", threshold=0.7)
    clicks = traffic(2000, seed=5)
    logged_in = {c.click_id for c in clicks if c.customer_id}
    assert logged_in, "the traffic needs logged-in clicks to show the profiles were read"
    cache.load(s, _profiles(clicks))  # through TLS + password

    env = {**secure.env, "SLIDR_TOPIC_PREFIX": prefix, "SLIDR_WORKER_ID": s.worker_id,
           "SLIDR_REDIS_KEY_PREFIX": prefix, "SLIDR_HOME": str(s.home), "SLIDR_REGISTRY_PATH": str(s.registry_path),
           "SLIDR_WORKER_WEB_PORT": "0"}
    log = tmp_path / "worker.log"
    with log.open("ab") as f:
        worker = subprocess.Popen([sys.executable, "-m", "slidr", "worker", "--data-dir", str(tmp_path / "faust"),
                                   "--loglevel", "info"], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        asyncio.run(K.produce(s, t.clicks, clicks))
        want = {c.click_id for c in clicks}

        def done(rec: dict[str, list]) -> bool:
            return {m.key.decode() for m in rec[t.decisions]} >= want

        def alive() -> None:
            assert worker.poll() is None, f"worker died with {worker.returncode}: {log.read_text()[-3000:]}"

        t0 = time.monotonic()
        rec = asyncio.run(K.read_until(s, [t.decisions], done, 240, alive))
        assert done(rec), f"{len({m.key for m in rec[t.decisions]})} of {len(want)} decided in " \
                          f"{time.monotonic() - t0:.0f} s; log: {log.read_text()[-3000:]}"
    finally:
        K.stop(worker)

    ledger = ledger_of(decode_decision(m.value) for m in rec[t.decisions])  # billing's own reading
    assert set(ledger.latest) == want
    assert {d.model_version for d in ledger.latest.values()} == {"toy-sec"}
    assert not any(getattr(d, "degraded", False) for d in ledger.latest.values())
    # profiles came from the TLS redis-server: every logged-in click's customer had one (rfm_known = 1)
    known = F.FEATURE_NAMES.index("rfm_known")
    # the whole log, read after the worker stopped: a batch's feature-log records go out after its decisions
    logged = asyncio.run(K.read_partitions(s, t.feature_log))
    rows = {r["click_id"]: r["features"] for ms in logged.values() for m in ms for r in read_feature_log(m.value)}
    assert logged_in <= set(rows) and all(rows[cid][known] == 1.0 for cid in logged_in)

    text = log.read_text(errors="replace")
    assert "toy-sec" in text  # the log is the worker's (it names the model it scores with)
    assert "Authenticated as slidr via SCRAM-SHA-512" in text  # aiokafka's own word for the SASL handshake
    assert secure.kafka_password not in text and secure.redis_password not in text
