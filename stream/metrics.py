"""Prometheus metrics of the worker and the monitor (prometheus-client), served by ``start`` on their own port.

Everything is updated once per stage batch (counts added in bulk), never per click, so metrics cost a few
microseconds per batch (``slidr bench e2e`` with ``--set metrics=1`` measures it against metrics off).
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

CLICKS = Counter("slidr_clicks_total", "Events taken by a stage (user: clicks; ip: clicks in by-ip records)",
                 ["stage"])
DECISIONS = Counter("slidr_decisions_total", "Decisions published", ["slice", "valid", "model_version"])
DEGRADED = Counter("slidr_degraded_decisions_total", "Decisions scored without the profile cache")
DEAD_LETTERS = Counter("slidr_dead_letters_total", "Messages dead-lettered", ["stage"])
FAILED_BATCHES = Counter("slidr_failed_batch_attempts_total", "Stage batch attempts that raised", ["stage"])
BATCH_SIZE = Histogram("slidr_batch_events", "Events per stage batch", ["stage"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
BATCH_SECONDS = Histogram("slidr_batch_seconds", "Time of a stage batch (events taken to records handed over)",
                          ["stage"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
SCORING_SECONDS = Histogram("slidr_scoring_seconds", "Time of one ONNX call (a scoring batch)",
                            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05))
CONSUMER_LAG = Gauge("slidr_consumer_lag", "Messages behind the end of an assigned partition", ["topic", "partition"])
ACTIVE_MODEL = Gauge("slidr_active_model", "1 for the model version this worker scores with", ["model_version"])
MODEL_SWAPS = Counter("slidr_model_swaps_total", "Model switches of a running worker", ["outcome"])
WATERMARK_FORCED = Counter("slidr_watermark_forced_total", "Clicks the IP stage released before the watermark "
                           "passed them (held longer than watermark_max_hold_s, or over watermark_max_held)")
HELD = Gauge("slidr_ip_held_clicks", "Clicks the IP stage holds until the watermark passes them")
REDIS_UP = Gauge("slidr_profile_cache_up", "1 while the profile cache answers, 0 in degraded mode")
TABLE_KEYS = Gauge("slidr_table_keys", "Keys held by a table (this worker's partitions)", ["table"])
TABLE_ROCKSDB = Gauge("slidr_table_rocksdb_bytes", "RocksDB's own accounting of a table's stores on this worker: "
                      "memtables, block_cache, table_readers (memory) and sst_files (disk)", ["table", "kind"])
COMMIT_PAST_UNHANDLED = Counter("slidr_commit_past_unhandled_total", "Committed offsets this worker found past clicks "
                                "its stage never handled (fetched again; a broken commit rule)", ["stage"])
EVICTED = Counter("slidr_table_evictions_total", "Keys evicted before their TTL (partition over its bound)",
                  ["table"])

# the monitor's
LIVE_IVR = Gauge("slidr_live_ivr", "Share of clicks invalidated over the monitor's window", ["slice"])
LIVE_FPR = Gauge("slidr_live_fpr", "Share of purchasing clicks invalidated over the monitor's window", ["slice"])
LIVE_DECISIONS = Counter("slidr_monitor_decisions_total", "Decisions seen by the monitor", ["model_version"])
ROLLBACKS = Counter("slidr_automatic_rollbacks_total", "Rollbacks the monitor made", ["from_version"])


def start(port: int, bind: str = "127.0.0.1") -> None:
    """Serve /metrics on ``bind:port`` from a background thread (port 0: off)."""
    if port:
        start_http_server(port, addr=bind)
        log.info("metrics on http://%s:%d/metrics", bind, port)


def set_active(version: str) -> None:
    ACTIVE_MODEL.clear()
    ACTIVE_MODEL.labels(version).set(1)

# the worker's health verdict (stream/health.py), read by `slidr health` (the images' HEALTHCHECK)
HEALTH_CHECK = Gauge("slidr_worker_health_check", "1 when this health check passes (broker, assigned, model, progress)",
                     ["check"])
HEALTHY = Gauge("slidr_worker_healthy", "1 when every health check passes")
HEALTH_TIME = Gauge("slidr_worker_health_timestamp_seconds", "Unix time of the last health verdict")
