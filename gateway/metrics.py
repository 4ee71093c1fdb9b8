"""Prometheus metrics, kept in a registry the app owns (no module-level globals).

Counters count what happened to messages (accepted, relayed, deferred, bounced, shunted); the
queue depth is read from the store when Prometheus scrapes, so it is right across processes; the
accept latency is the time from the end of DATA to the "250" (the durable commit included).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.accepted = Counter(
            "mailgate_messages_accepted",
            "Messages accepted (250 given)",
            ["source"],
            registry=self.registry,
        )
        self.refused = Counter(
            "mailgate_messages_refused",
            "Messages or commands refused",
            ["reason"],
            registry=self.registry,
        )
        self.relayed = Counter(
            "mailgate_recipients_relayed", "Recipients delivered upstream", registry=self.registry
        )
        self.deferred = Counter(
            "mailgate_recipients_deferred",
            "Recipient deliveries deferred for retry",
            registry=self.registry,
        )
        self.bounced = Counter(
            "mailgate_recipients_bounced",
            "Recipients failed permanently (DSN sent)",
            registry=self.registry,
        )
        self.shunted = Counter(
            "mailgate_messages_shunted",
            "Messages set aside after an unexpected error",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "mailgate_queue_depth", "Messages in each state", ["state"], registry=self.registry
        )
        self.accept_latency = Histogram(
            "mailgate_accept_latency_seconds",
            "End of DATA to 250, including the durable commit",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )

    def set_queue_depth(self, counts: dict[str, int]) -> None:
        for state in ("queued", "done", "bounced", "discarded", "shunted"):
            self.queue_depth.labels(state=state).set(counts.get(state, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
