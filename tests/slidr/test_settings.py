from __future__ import annotations

import pytest

from slidr.settings import Settings
from slidr.topics import Topics, topic_specs


def test_env_prefix_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIDR_KAFKA_BOOTSTRAP", "10.1.2.3:9093")
    monkeypatch.setenv("SLIDR_PARTITIONS", "12")
    monkeypatch.setenv("SLIDR_REDIS_URL", "rediss://cache:6380/2")
    s = Settings()
    assert (s.kafka_host, s.kafka_port, s.partitions) == ("10.1.2.3", 9093, 12)
    assert (s.redis_host, s.redis_port) == ("cache", 6380)


def test_invalid_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIDR_PARTITIONS", "0")
    with pytest.raises(ValueError, match="partitions"):
        Settings()


def test_combo_shards_is_a_setting_shared_with_the_feature_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from slidr.settings import FeatureSettings

    monkeypatch.delenv("SLIDR_COMBO_SHARDS", raising=False)
    assert Settings().combo_shards == FeatureSettings().combo_shards == 4
    monkeypatch.setenv("SLIDR_COMBO_SHARDS", "12")
    assert Settings().combo_shards == FeatureSettings().combo_shards == 12
    monkeypatch.setenv("SLIDR_COMBO_SHARDS", "0")
    with pytest.raises(ValueError, match="combo_shards"):
        FeatureSettings()


def test_sasl_ssl_client_kwargs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIDR_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("SLIDR_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("SLIDR_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("SLIDR_KAFKA_SASL_PASSWORD", "s3cret")
    kw = Settings().kafka_client_kwargs()
    assert kw["security_protocol"] == "SASL_SSL"
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kw["sasl_plain_password"] == "s3cret"
    assert kw["ssl_context"] is not None
    assert "s3cret" not in repr(Settings())  # secrets never show in logs


def test_topic_names_live_in_one_place() -> None:
    s = Settings(partitions=6)
    specs = {t.name: t for t in topic_specs(s, "p")}
    t = Topics("p")
    assert set(specs) == {t.clicks, t.purchases, t.decisions, t.dead_letters, t.feature_log}
    assert specs[t.clicks].partitions == 6


def test_the_stuck_time_must_outlast_the_watermark_idle_time() -> None:
    """Clicks held for the watermark count as work pending for the health check (stream/health.py)."""
    with pytest.raises(ValueError, match="must exceed watermark_idle_s"):
        Settings(health_stuck_after_s=5, watermark_idle_s=5)
    assert Settings(health_stuck_after_s=5, watermark_idle_s=5, ip_watermark=False).health_stuck_after_s == 5
