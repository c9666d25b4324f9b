"""The one typed settings object for every slidr process.

Every field can be set from the environment with the ``SLIDR_`` prefix (``SLIDR_KAFKA_BOOTSTRAP``,
``SLIDR_PARTITIONS`` ...) or from a ``.env`` file in the working directory. Defaults give a working
single-machine setup on loopback: the local broker and redis-server that ``slidr up`` starts.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class FeatureSettings(BaseSettings):
    """The settings that define what the features are, so training, the worker, replay and ``slidr score`` must
    agree on them: ``stream.features`` reads them once, at import, and the feature spec hash covers them (a model
    trained with other values is refused: ``stream.scoring.load_model``). Part of ``Settings``, the same fields."""

    model_config = SettingsConfigDict(env_prefix="SLIDR_", env_file=".env", extra="ignore")

    combo_shards: int = Field(4, ge=1, le=1024, description=(
        "Shards of IPs the IP stage keeps its user agent x ad counters in (crc32(ip key) % combo_shards; "
        "stream.features.update_combo). The partition count must divide it, so it bounds the workers: 4 allows 1, "
        "2 or 4 partitions, 12 allows up to 12. Fewer shards detect more bots (each sees more IPs): bot recall at 1% "
        "human FIR on the large scenario, 4 shards 0.866, 12 shards 0.841 (docs/design.md). A feature setting: set it "
        "alike for training and for every worker (the deployment's shared config), and retrain to change it."))


class Settings(FeatureSettings):  # (its model_config, env prefix SLIDR_, is FeatureSettings')
    # --- local state -------------------------------------------------------------------------
    home: Path = Field(Path(".slidr"), description="State folder: service data, logs, pid files, registry.")
    cache_dir: Path = Field(Path(".cache"), description="Download cache (Kafka jars), git-ignored.")

    # --- Kafka -------------------------------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:19092", description="Broker address(es), comma separated.")
    kafka_version: str = Field("4.1.1", description="Apache Kafka release the local broker runs.")
    kafka_controller_port: int = Field(19093, description="KRaft controller port of the local broker.")
    kafka_heap: str = Field("-Xmx1G -Xms512m", description="JVM heap flags of the local broker.")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism for a production cluster (with SASL_* protocols)."
    )
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = Field(None, description="CA bundle that signed the brokers' certificates.")
    kafka_ssl_certfile: Path | None = Field(None, description="Client certificate (mutual TLS).")
    kafka_ssl_keyfile: Path | None = Field(None, description="Client private key (mutual TLS).")

    # --- topics ------------------------------------------------------------------------------
    topic_prefix: str = Field("slidr", description="Prefix of every topic this deployment owns.")
    partitions: int = Field(4, ge=1, description="Partitions of the data topics.")
    replication_factor: int = Field(1, ge=1, description="Replication factor (1 for the local broker).")

    # --- Redis -------------------------------------------------------------------------------
    redis_url: str = Field("redis://127.0.0.1:16379/0", description="Profile cache (rediss:// for TLS).")
    redis_password: SecretStr | None = Field(None, description="Redis AUTH password (overrides the URL's).")
    redis_tls_cafile: Path | None = Field(None, description="CA bundle for a rediss:// server.")
    redis_key_prefix: str = Field("slidr", description="Namespace of every Redis key slidr reads or writes.")

    # --- models and the worker ---------------------------------------------------------------
    registry_path: Path = Field(Path(".slidr/registry"), description="Model registry folder.")
    worker_id: str = Field("slidr-detector", description="Faust app id = the detector's consumer group.")
    worker_web_port: int = Field(6066, description="Faust web port of the first worker (0 disables it).")
    worker_web_bind: str = Field("127.0.0.1", description=(
        "Address the worker's web server binds (health and stats only; Faust's table and router views are off: "
        "they served any table key's state to whoever asked)."))
    score_batch_size: int = Field(512, ge=1, le=1024, description=(
        "Clicks the user stage buffers before it forwards them (one by-ip record per partition; each record is "
        "scored in one ONNX call). At most 1024, which keeps a record well under Kafka's 1 MB message limit."))
    sweep_keys_per_click: float = Field(0.25, ge=0, description=(
        "Table keys checked for expiry per click handled (0: never delete idle keys): each stage flush checks that "
        "many keys of each partition it handled, going round the partition. Keys idle for more than the state TTL "
        "+ grace in event time are deleted, tombstoned in the changelog."))
    max_keys_per_partition: int = Field(5_000_000, ge=1, description=(
        "Bound on a table partition's keys: above it, the sweep evicts keys idle for more than an hour before their "
        "TTL (their counters start over), logged and counted (the worker's report line)."))
    ip_watermark: bool = Field(True, description=(
        "Per-IP features independent of arrival order: the IP stage holds each click until every input partition "
        "of the user stage has passed it in event time, and counts clicks in event-time order (stream/stages.py, "
        "IpStage). Off: clicks are counted as they arrive, and a lagging partition changes other clicks' features."))
    watermark_idle_s: float = Field(5.0, gt=0, description=(
        "An input partition whose event time has not moved for this long (wall clock) no longer holds the IP "
        "stage's watermark back: the longest a click waits for a partition without traffic."))
    watermark_max_hold_s: float = Field(60.0, gt=0, description=(
        "Longest the IP stage holds a click for the watermark (wall clock); then it is released anyway (counted)."))
    watermark_max_held: int = Field(100_000, ge=1, description=(
        "Most clicks the IP stage holds per by-ip partition; beyond it the oldest are released anyway (counted)."))
    rocksdb_write_buffer_mib: int = Field(8, ge=1, description=(
        "RocksDB memtable size of each table partition's store (two are kept: one filling, one flushing). Faust's "
        "default, 64 MiB x 3, let a worker's resident memory grow by up to 1.5 GiB for 2 tables x 4 partitions "
        "before the memtables first flushed, and that looked like a leak in the soak bench."))
    rocksdb_block_cache_mib: int = Field(16, ge=1, description=(
        "RocksDB block cache of each table partition's store (Faust's default: 2 GiB each). Hot keys are read "
        "from the memtables; the cache serves keys flushed to disk."))
    score_batch_within_s: float = Field(0.01, gt=0, description=(
        "Longest a click waits in the user stage's buffer before it is forwarded to scoring."))
    redis_timeout_s: float = Field(0.25, gt=0, description=(
        "Longest the IP stage waits for the profile cache (one MGET per scoring batch). Past it, or when Redis is "
        "unreachable, the batch is scored in degraded mode (profile features missing, decisions flagged "
        "'degraded') and Redis is retried with backoff."))
    metrics_port: int = Field(0, ge=0, description=(
        "Port of the Prometheus /metrics endpoint of `slidr worker` (0: off); `slidr monitor` uses the next one."))
    metrics_bind: str = Field("127.0.0.1", description="Address the metrics endpoints bind.")
    health_stuck_after_s: float = Field(60.0, gt=0, description=(
        "`slidr health`: a worker whose input partitions have lag and whose stages completed no batch for this "
        "long is stuck (unhealthy: a Kubernetes liveness probe restarts it)."))
    health_stuck_exit: bool = Field(True, description=(
        "A worker stuck for health_stuck_after_s while the broker answers, or whose event loop ran no health "
        "check for that long, stops itself without committing (exit 70) for its supervisor to restart it."))
    model_poll_s: float = Field(1.0, gt=0, description=(
        "How often a running worker checks the registry's ACTIVE model; a new one is loaded, verified and used "
        "from the next scoring batch on (hot swap)."))
    monitor_window_s: float = Field(300.0, gt=0, description="Sliding window of `slidr monitor`'s live rates.")
    monitor_min_decisions: int = Field(1000, ge=1, description=(
        "Decisions of the active model in the window before its live IVR can trigger a rollback."))
    monitor_min_purchases: int = Field(50, ge=1, description=(
        "Purchasing clicks of the active model in the window before its live FPR can trigger a rollback."))
    monitor_ivr_factor: float = Field(3.0, gt=1, description=(
        "Roll back when live IVR exceeds this multiple of the IVR the calibration measured on validation..."))
    monitor_ivr_margin: float = Field(0.05, ge=0, description="... and exceeds it by this much at least.")
    monitor_ivr_max: float = Field(0.5, gt=0, le=1, description=(
        "The IVR limit for a model whose calibration records no validation IVR."))
    monitor_fpr_factor: float = Field(3.0, gt=1, description=(
        "Roll back when live FPR exceeds this multiple of the model's FPR budget..."))
    monitor_fpr_margin: float = Field(0.02, ge=0, description="... and exceeds it by this much at least.")
    max_future_skew_s: float = Field(300.0, gt=0, description=(
        "A click stamped more than this ahead of the worker's clock is dead-lettered (field ts): one far-future "
        "click would otherwise blind its keys' counters and move the partition's expiry clock."))
    max_lateness_s: float = Field(3600.0, ge=0, description=(
        "A click older than the longest feature window (24 h) plus this, behind the newest event time of its "
        "clicks partition, is dead-lettered (field ts): it would count in no window."))
    kafka_session_timeout_s: float = Field(10.0, ge=6, description=(
        "Consumer group session timeout: how long the group waits for a worker that stopped heartbeating (a crash) "
        "before it hands its partitions to the others. Faust's default, 60 s, held every partition of a killed "
        "worker that long."))
    stage_retries: int = Field(5, ge=1, description=(
        "Attempts at a stage batch that raised (its table writes and records dropped, then taken again) before "
        "the worker stops without committing past it."))
    onnx_providers: str = Field(
        "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider",
        description="onnxruntime execution providers in order of preference (the available ones are used).",
    )

    # --- secrets from files, local secure listeners ------------------------------------------
    kafka_sasl_password_file: Path | None = Field(None, description=(
        "File whose first line is the SASL password (a mounted secret); read when kafka_sasl_password is unset."))
    redis_password_file: Path | None = Field(None, description=(
        "File whose first line is the Redis password; read when redis_password is unset."))
    kafka_sasl_ssl_port: int | None = Field(None, description=(
        "Local broker (`slidr up`): also listen SASL_SSL (SCRAM-SHA-512, the user kafka_sasl_username with its "
        "password, TLS certificates from certs_dir) on 127.0.0.1:<port>; off by default."))
    kafka_plaintext_port: int | None = Field(None, description=(
        "Local broker's PLAINTEXT (inter-broker) port when kafka_bootstrap names its SASL_SSL listener; "
        "default: the bootstrap's port."))
    certs_dir: Path | None = Field(None, description=(
        "Certificates of the local broker's SASL_SSL listener and of a local rediss:// redis-server, made by "
        "deploy/local/certs.sh on `slidr up` when missing (clients trust <certs_dir>/ca.crt); default <home>/certs."))

    # --- retrain guardrails (models/guardrails.py; a candidate failing any check is never promoted) ------------
    guard_min_purchase_density: float = Field(0.002, ge=0, description=(
        "Data: every hour of the week present in the window with at least guard_min_hour_clicks clicks must have "
        "at least this share of purchasing clicks (simulated traffic: about 0.024 overall, 0.005 at worst)."))
    guard_min_hour_clicks: int = Field(300, ge=1, description=(
        "Data: an hour of the week with fewer clicks is not judged on purchase density (too few to tell)."))
    guard_label_gap_p_value: float = Field(1e-4, gt=0, lt=1, description=(
        "Data: an hour of the window with no purchase event is a label gap when P(0 purchases) under the window's "
        "purchase rate and that hour's click volume is below this (a 2-hour outage of the small scenario: "
        "P = 3e-7 and 8e-7; a night hour with 180 clicks: 0.013)."))
    guard_volume_max_ratio: float = Field(3.0, gt=1, description=(
        "Data: each slice's clicks per hour may be at most this many times, or at least 1/this, those of the "
        "previous retrain window."))
    guard_volume_min_clicks: int = Field(1000, ge=1, description=(
        "Data: slices with fewer clicks in both windows are not compared on volume."))
    guard_ivr_max_delta: float = Field(0.05, ge=0, description=(
        "Model: each slice's IVR on the evaluation window may differ from the stable model's by at most this."))
    guard_ivr_max_ratio: float = Field(2.0, gt=1, description=(
        "Model: no slice may invalidate more than this many times the stable model's share of its clicks "
        "(checked when the rise is also above guard_ivr_max_delta / 2)."))
    guard_fpr_max_increase: float = Field(0.03, ge=0, description=(
        "Model: each slice's FPR (purchasing clicks invalidated) may exceed the stable model's by at most this."))
    guard_coverage_max_drop: float = Field(0.2, ge=0, description=(
        "Model: each slice's robotic coverage may fall below the stable model's by at most this."))
    guard_max_fpr: float = Field(0.1, gt=0, le=1, description=(
        "Model: no slice's FPR may exceed this, whatever the stable model does (the check used when there is no "
        "stable model to compare with)."))
    guard_min_slice_purchases: int = Field(20, ge=1, description=(
        "Model: slices with fewer purchasing clicks in the evaluation window are not judged on FPR."))
    guard_min_slice_robotic: int = Field(20, ge=1, description=(
        "Model: slices with fewer robotic clicks in the evaluation window are not judged on coverage."))

    # --- derived -----------------------------------------------------------------------------
    @property
    def redis_port(self) -> int:
        return urlparse(self.redis_url).port or 6379

    @property
    def redis_host(self) -> str:
        return urlparse(self.redis_url).hostname or "127.0.0.1"

    @property
    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])

    @property
    def kafka_host(self) -> str:
        return self.kafka_bootstrap.split(",")[0].rsplit(":", 1)[0]

    def faust_credentials(self) -> Any:
        """The Kafka credentials as a Faust app's ``broker_credentials`` (None for PLAINTEXT)."""
        if self.kafka_security_protocol == "PLAINTEXT":
            return None
        import faust

        ctx = self.kafka_client_kwargs().get("ssl_context")
        if self.kafka_security_protocol.startswith("SASL"):
            return faust.SASLCredentials(
                username=self.kafka_sasl_username, ssl_context=ctx, mechanism=self.kafka_sasl_mechanism or "PLAIN",
                password=self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None,
            )
        return faust.SSLCredentials(ctx)

    def kafka_client_kwargs(self) -> dict[str, Any]:
        """Connection keywords for aiokafka clients (producer, consumer, admin)."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            ctx = ssl.create_default_context(cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None)
            if self.kafka_ssl_certfile:
                ctx.load_cert_chain(str(self.kafka_ssl_certfile), str(self.kafka_ssl_keyfile or ""))
            kw["ssl_context"] = ctx
        if self.kafka_security_protocol.startswith("SASL"):
            kw["sasl_mechanism"] = self.kafka_sasl_mechanism or "PLAIN"
            kw["sasl_plain_username"] = self.kafka_sasl_username
            kw["sasl_plain_password"] = (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
            )
        return kw

    def redis_kwargs(self) -> dict[str, Any]:
        """Keywords for ``redis.asyncio.from_url(settings.redis_url, **kwargs)``."""
        kw: dict[str, Any] = {}
        if self.redis_password:
            kw["password"] = self.redis_password.get_secret_value()
        if self.redis_tls_cafile:
            kw["ssl_ca_certs"] = str(self.redis_tls_cafile)
        return kw

    @field_validator("kafka_sasl_password_file", "redis_password_file")
    @classmethod
    def _readable(cls, path: Path | None) -> Path | None:
        # checked here, where an error shows only the path (a model-level error would show every input)
        if path is not None:
            try:
                path.read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read the secret file {path}: {e.strerror}") from None
        return path

    @model_validator(mode="after")
    def _secrets_from_files(self) -> Settings:
        if self.kafka_sasl_password is None and self.kafka_sasl_password_file is not None:
            self.kafka_sasl_password = SecretStr(_read_secret(self.kafka_sasl_password_file))
        if self.redis_password is None and self.redis_password_file is not None:
            self.redis_password = SecretStr(_read_secret(self.redis_password_file))
        return self

    @model_validator(mode="after")
    def _stuck_after_outlasts_the_watermark_idle_time(self) -> Settings:
        # held clicks are work pending for the health check; the timer releases them within watermark_idle_s
        if self.ip_watermark and self.health_stuck_after_s <= self.watermark_idle_s:
            raise ValueError(f"health_stuck_after_s ({self.health_stuck_after_s:g}) must exceed watermark_idle_s "
                             f"({self.watermark_idle_s:g}): clicks held that long for the watermark would make the "
                             "worker look stuck")
        return self

    def redis_secret(self) -> str | None:
        """The Redis password in effect: redis_password (or its file), else the URL's."""
        if self.redis_password is not None:
            return self.redis_password.get_secret_value()
        return urlparse(self.redis_url).password

    @property
    def redis_url_redacted(self) -> str:
        """``redis_url`` fit to print or log (its password, if any, masked)."""
        from slidr.redact import redact_url

        return redact_url(self.redis_url)

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        # repr() / str() never show a password held in the Redis URL (SecretStr fields mask themselves)
        for name, value in super().__repr_args__():
            yield name, self.redis_url_redacted if name == "redis_url" else value


def _read_secret(path: Path) -> str:
    text = path.read_text()
    return text.splitlines()[0] if text else ""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
