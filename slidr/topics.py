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


@dataclass(frozen=True, slots=True)
class ReplayTopics(Topics):
    """A replay's private topics (``<prefix>.replay-<id>.decisions`` ...: ``prefix`` is the private one) reading the
    live deployment's clicks (``source``: the live prefix). ``stream.replay`` wires the worker's stages to these."""

    source: str = "slidr"

    @property
    def clicks(self) -> str:  # the live clicks: a replay reads them, never writes them
        return f"{self.source}.clicks"

    @property
    def by_user(self) -> str:  # private repartition of foreign producers' clicks
        return f"{self.prefix}.by-user"

    @property
    def by_ip_raw(self) -> str:  # the replay's user stage sends its by-ip records here
        return f"{self.prefix}.by-ip-raw"

    @property
    def by_ip(self) -> str:  # ... and its IP stage reads them from here, in the live run's order
        return f"{self.prefix}.by-ip"


def replay_topics(settings: Settings, replay_id: str) -> ReplayTopics:
    return ReplayTopics(f"{settings.topic_prefix}.replay-{replay_id}", settings.topic_prefix)


def replay_worker_id(settings: Settings, replay_id: str) -> str:
    """A replay agent's Faust app id and consumer group (its changelogs follow: ``changelog_topic``)."""
    return f"{settings.worker_id}-replay-{replay_id}"


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
