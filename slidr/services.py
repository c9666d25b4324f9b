"""Local services (Kafka broker, redis-server) and topic management.

The mechanics live in the shell scripts under ``deploy/local/``; this module runs them with the values from
:class:`~slidr.settings.Settings` and adds the checks that need a client: a real metadata request to the broker,
a PING to Redis, and idempotent topic creation.

A service is *ours* when this instance's pid file (under ``settings.home``) names a live process. One that answers
on the configured address without being ours (another checkout's, another SLIDR_HOME's) counts as running:
``up`` uses it and ``down`` leaves it alone. A port held by something that does not answer as the service
with these settings is a clean :class:`ServiceError` naming the holder's pid.

Secure local setup (off by default): ``kafka_sasl_ssl_port`` adds a SASL_SSL listener (SCRAM-SHA-512) to the
broker; a ``rediss://`` ``redis_url`` starts redis-server with TLS only on that port; a Redis password turns on
``requirepass``. Certificates come from ``deploy/local/certs.sh`` in ``settings.certs_dir`` (default
``<home>/certs``). No message here ever holds a secret: Redis URLs are printed redacted.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from slidr.settings import Settings
from slidr.topics import TopicSpec, topic_specs

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "local"
SERVICES = ("kafka", "redis")


class ServiceError(RuntimeError):
    pass


def certs_dir(s: Settings) -> Path:
    return (s.certs_dir or s.home / "certs").resolve()


def kafka_ports(s: Settings) -> dict[str, int]:
    """The local broker's listener ports by name (``plaintext``, ``controller``, ``sasl_ssl`` when on)."""
    sasl = s.kafka_sasl_ssl_port
    plain = s.kafka_plaintext_port or (s.kafka_port if s.kafka_port != sasl else None)
    if plain is None:
        raise ServiceError("SLIDR_KAFKA_BOOTSTRAP names the SASL_SSL port: set SLIDR_KAFKA_PLAINTEXT_PORT to the "
                           "local broker's PLAINTEXT (inter-broker) port")
    ports = {"plaintext": plain, "controller": s.kafka_controller_port}
    if sasl:
        ports["sasl_ssl"] = sasl
    return ports


def redis_ports(s: Settings) -> dict[str, int]:
    """The local redis-server's ports: ``tls`` for a rediss:// URL (plain port off), else ``plain``."""
    return {"tls" if urlparse(s.redis_url).scheme == "rediss" else "plain": s.redis_port}


def _env(s: Settings) -> dict[str, str]:
    kp, rp = kafka_ports(s), redis_ports(s)
    env = {
        **os.environ,
        "SLIDR_HOME": str(s.home.resolve()),
        "SLIDR_CACHE_DIR": str(s.cache_dir.resolve()),
        "SLIDR_KAFKA_VERSION": s.kafka_version,
        "SLIDR_KAFKA_PORT": str(kp["plaintext"]),
        "SLIDR_KAFKA_CONTROLLER_PORT": str(s.kafka_controller_port),
        "SLIDR_KAFKA_HEAP": s.kafka_heap,
        "SLIDR_KAFKA_SASL_SSL_PORT": str(kp.get("sasl_ssl", "")),
        "SLIDR_CERTS_DIR": str(certs_dir(s)),
        "SLIDR_KAFKA_SASL_USERNAME": s.kafka_sasl_username or "slidr",
        "SLIDR_KAFKA_SASL_PASSWORD": s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else "",
        "SLIDR_REDIS_PORT": str(rp.get("plain", 0)),
        "SLIDR_REDIS_TLS_PORT": str(rp.get("tls", "")),
        "SLIDR_REDIS_PASSWORD": s.redis_secret() or "",
    }
    for k in ("SLIDR_KAFKA_SASL_PASSWORD_FILE", "SLIDR_REDIS_PASSWORD_FILE"):  # resolved above
        env.pop(k, None)
    return env


def run_script(service: str, action: str, s: Settings, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``deploy/local/<service>.sh <action>``; its progress goes to stderr, its answer to stdout."""
    proc = subprocess.run(
        ["bash", str(DEPLOY / f"{service}.sh"), action],
        env=_env(s), stdout=subprocess.PIPE, stderr=None, text=True, check=False,
    )
    if check and proc.returncode != 0:
        raise ServiceError(f"{service} {action} failed (exit {proc.returncode})")
    return proc


# --- who holds a port --------------------------------------------------------------------------


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f[9])
    return inodes


def port_holder(port: int) -> tuple[int, str] | None:
    """(pid, process name) of the process listening on ``port``, when /proc lets us see it."""
    targets = {f"socket:[{i}]" for i in _listening_inodes(port)}
    if not targets:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in targets:
                    # the name only: a command line may hold secrets (e.g. redis-server --requirepass ...)
                    return int(proc.name), (proc / "comm").read_text().strip()
        except OSError:  # gone, or not ours to look at
            continue
    return None


def _holder_text(port: int) -> str:
    h = port_holder(port)
    return f"pid {h[0]} ({h[1]})" if h else "a process whose pid is not visible to this user"


# --- state -------------------------------------------------------------------------------------


@dataclass
class ServiceState:
    name: str
    state: str  # "running" | "stopped" | "blocked" (a port is held by something that does not answer)
    ours: bool  # started by this instance (its pid file under settings.home)
    pid: int | None
    line: str  # what `slidr status` prints
    problem: str | None = None  # why a blocked service cannot start

    @property
    def running(self) -> bool:
        return self.state == "running"


def _pid_of(line: str) -> int | None:
    try:
        return int(line.split("pid=")[1].split()[0])
    except (IndexError, ValueError):
        return None


def _address(svc: str, s: Settings) -> str:
    return f"bootstrap={s.kafka_bootstrap}" if svc == "kafka" else f"url={s.redis_url_redacted}"


def _answers(svc: str, s: Settings) -> bool:
    if svc == "redis":
        return ping_redis(s)
    try:
        asyncio.run(_kafka_metadata(s, 3.0))
        return True
    except Exception:
        return False


def service_state(svc: str, s: Settings) -> ServiceState:
    """Ours (pid file), someone else's that answers on the configured address, stopped, or a blocked port."""
    proc = run_script(svc, "status", s, check=False)
    if proc.returncode == 0:
        line = proc.stdout.strip()
        return ServiceState(svc, "running", True, _pid_of(line), f"{line} (started by this instance)")
    ports = kafka_ports(s) if svc == "kafka" else redis_ports(s)
    busy = {name: p for name, p in ports.items() if port_open(p)}
    if not busy:
        return ServiceState(svc, "stopped", False, None, f"{svc}: stopped")
    if _answers(svc, s):
        h = port_holder(next(iter(busy.values())))
        pid = h[0] if h else None
        return ServiceState(svc, "running", False, pid, f"{svc}: running pid={pid or '?'} {_address(svc, s)} "
                            f"(not started by this instance: no live pid file in {s.home.resolve()})")
    name, p = next(iter(busy.items()))
    problem = (f"{svc}'s {name} port 127.0.0.1:{p} is taken by another instance or program: {_holder_text(p)}, "
               f"which does not answer as {svc} at {_address(svc, s)} with these settings; stop it, or configure "
               f"other ports")
    return ServiceState(svc, "blocked", False, None, f"{svc}: stopped; {problem}", problem)


def status(s: Settings) -> dict[str, ServiceState]:
    return {svc: service_state(svc, s) for svc in SERVICES}


# --- clients -----------------------------------------------------------------------------------


async def _kafka_metadata(s: Settings, timeout_s: float) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**s.kafka_client_kwargs(), request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        return sorted(await asyncio.wait_for(admin.list_topics(), timeout_s))
    finally:
        await admin.close()


def wait_kafka(s: Settings, timeout_s: float = 60.0) -> list[str]:
    """Block until the broker answers a metadata request; return its topic names."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return asyncio.run(_kafka_metadata(s, 5.0))
        except Exception as e:  # broker still starting: connection refused, no controller yet, ...
            last = e
            time.sleep(0.5)
    raise ServiceError(f"Kafka at {s.kafka_bootstrap} did not answer a metadata request: {last!r}")


def ping_redis(s: Settings) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(s.redis_url, socket_timeout=2, **s.redis_kwargs()).ping())
    except redis.RedisError:
        return False


def _say(svc: str, msg: str) -> None:
    print(f"[{svc}] {msg}", file=sys.stderr, flush=True)


def up(s: Settings) -> None:
    """Start what is not running; use a service someone else started if it answers; fail cleanly on a port
    held by anything else."""
    for svc in ("redis", "kafka"):
        st = service_state(svc, s)
        if st.problem:
            raise ServiceError(st.problem)
        if st.running and not st.ours:
            _say(svc, f"already running on {_address(svc, s)} (pid {st.pid or '?'}), started by another instance "
                      f"(no live pid file in {s.home.resolve()}): using it")
            continue
        run_script(svc, "up", s)  # ours: a no-op that says "already running"
    wait_kafka(s)
    if not ping_redis(s):
        raise ServiceError(f"redis at {s.redis_url_redacted} does not answer PING")


def down(s: Settings, only: Iterable[str] | None = None) -> None:
    """Stop the services this instance started (``only``: just these of them)."""
    for svc in reversed(SERVICES):
        if only is not None and svc not in only:
            continue
        st = service_state(svc, s)
        if st.running and not st.ours:
            _say(svc, f"not started by this instance (pid {st.pid or '?'}): left running")
            continue
        run_script(svc, "down", s)


# --- topics ------------------------------------------------------------------------------------


async def create_topics_async(s: Settings, specs: list[TopicSpec]) -> list[str]:
    """Create the topics that do not exist yet; return the names created (idempotent)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        todo = [t for t in specs if t.name not in existing]
        if todo:
            await admin.create_topics(
                [NewTopic(t.name, t.partitions, s.replication_factor, topic_configs=dict(t.config)) for t in todo]
            )
        # wait until the new topics have leaders, so producers and Faust workers find them at once
        for _ in range(100):
            meta = await admin.describe_topics([t.name for t in todo]) if todo else []
            if all(m.get("error_code", 0) == 0 and m.get("partitions") for m in meta):
                break
            await asyncio.sleep(0.1)
        return [t.name for t in todo]
    finally:
        await admin.close()


def create_topics(s: Settings, prefix: str | None = None) -> list[str]:
    return asyncio.run(create_topics_async(s, topic_specs(s, prefix)))


async def drop_topics_async(s: Settings, prefix: str | Callable[[str], bool]) -> list[str]:
    """Delete every topic whose name starts with ``prefix`` (a test's or a demo run's), or that ``prefix`` picks
    when it is a function of the name; return them."""
    from aiokafka.admin import AIOKafkaAdminClient

    picks = prefix if callable(prefix) else (lambda t: t.startswith(prefix))
    admin = AIOKafkaAdminClient(**s.kafka_client_kwargs())
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if picks(t)]
        if names:
            await admin.delete_topics(names)
        return names
    finally:
        await admin.close()


def drop_topics(s: Settings, prefix: str) -> list[str]:
    return asyncio.run(drop_topics_async(s, prefix))
