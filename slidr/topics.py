"""Every Kafka topic slidr owns: names and partition counts live here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass

from slidr.settings import Settings


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    purpose: str
    config: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names of one deployment (the prefix lets tests run isolated copies side by side)."""

    prefix: str

    @property
    def clicks(self) -> str:  # raw clicks from producers
        return f"{self.prefix}.clicks"

    @property
    def purchases(self) -> str:  # purchase / attribution events
        return f"{self.prefix}.purchases"

    @property
    def decisions(self) -> str:  # billing topic: one decision per click (latest revision wins)
        return f"{self.prefix}.decisions"

    @property
    def dead_letters(self) -> str:  # malformed input with the reason and source offset
        return f"{self.prefix}.dead-letters"

    @property
    def feature_log(self) -> str:  # feature vector + model version of every scored click
        return f"{self.prefix}.feature-log"


def topic_specs(settings: Settings, prefix: str | None = None) -> list[TopicSpec]:
    t = Topics(prefix or settings.topic_prefix)
    n = settings.partitions
    return [
        TopicSpec(t.clicks, n, "raw clicks from producers"),
        TopicSpec(t.purchases, n, "purchases (attribution events)"),
        TopicSpec(t.decisions, n, "valid/invalid decision per click, keyed by click id",
                  (("cleanup.policy", "compact,delete"),)),
        TopicSpec(t.dead_letters, 1, "malformed clicks with the reason and source offset"),
        TopicSpec(t.feature_log, n, "features + model version of every scored click"),
    ]


def changelog_topic(settings: Settings, table: str) -> str:
    """A worker table's changelog: ``<prefix>.<worker id>.<table>-changelog`` (compacted). It carries the topic
    prefix, so two deployments on one broker never share one, and the worker id, so two detector groups of one
    deployment keep their own state."""
    return f"{settings.topic_prefix}.{settings.worker_id}.{table}-changelog"
