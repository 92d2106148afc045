"""Domain metrics. Each process creates one explicit `CollectorRegistry` and passes it in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def observe_many(histogram: Histogram, amount: float, count: int) -> None:
    """The same as `histogram.observe(amount)` called `count` times, in constant time.

    The aggregator observes one freshness per event, and a pass that catches up can hold
    hundreds of thousands of events with a handful of distinct storage times. The client
    library has no weighted observe, so this adds to the histogram's own sum and bucket
    (attributes of prometheus_client's Histogram); tests/metering/test_metrics.py checks it
    against repeated `observe`, so a library that changes them fails a test, not a count.
    """
    if count <= 0:
        return
    histogram._sum.inc(amount * count)
    for bucket, bound in zip(histogram._buckets, histogram._upper_bounds, strict=True):
        if amount <= bound:
            bucket.inc(count)
            return


class DependencyMetrics:
    """Retries and availability of Postgres and Kafka, shared by every process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.retries = Counter(
            "metering_dependency_retries",
            "Operations retried because a dependency (postgres, kafka) was unavailable.",
            ["dependency"],
            registry=registry,
        )
        self.up = Gauge(
            "metering_dependency_up",
            "1 while the last operation against the dependency succeeded, 0 while retrying.",
            ["dependency"],
            registry=registry,
        )


class ConsumerMetrics:
    """What the Kafka -> Postgres writer did; `reconcile` and alerts read these."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.dependencies = DependencyMetrics(registry)
        self.messages = Counter(
            "metering_consumer_messages",
            "Kafka messages consumed from the events topic (valid or not).",
            registry=registry,
        )
        self.stored = Counter(
            "metering_events_stored", "Events newly stored in usage_events.", registry=registry
        )
        self.duplicates = Counter(
            "metering_events_duplicate",
            "Valid events not stored again because their (org_id, id) was already stored.",
            registry=registry,
        )
        self.dead_lettered = Counter(
            "metering_events_dead_lettered",
            "Invalid messages sent to the dead-letter topic, by reason code.",
            ["reason"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "metering_batch_size_events",
            "Messages per consumed batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.write_seconds = Histogram(
            "metering_batch_write_seconds",
            "Time to write one batch to Postgres (one transaction), including retries.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.lag = Gauge(
            "metering_consumer_lag_messages",
            "Messages in the partition not yet consumed (high watermark - position).",
            ["topic", "partition"],
            registry=registry,
        )


FRESHNESS_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60)


class AggregatorMetrics:
    """What the aggregator did; its freshness is the service's main objective."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.dependencies = DependencyMetrics(registry)
        self.pass_seconds = Histogram(
            "metering_aggregation_pass_seconds",
            "Duration of one incremental aggregation pass (one transaction).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.events = Counter(
            "metering_events_aggregated", "Events added to usage_aggregations.", registry=registry
        )
        self.watermark_lag = Gauge(
            "metering_aggregation_watermark_lag_seconds",
            "Age of the oldest stored event not aggregated yet (0 when caught up).",
            registry=registry,
        )
        self.freshness = Histogram(
            "metering_aggregation_freshness_seconds",
            "Seconds from the consumer's storing of an event to its aggregation.",
            buckets=FRESHNESS_BUCKETS,
            registry=registry,
        )
        self.crossings = Counter(
            "metering_limit_crossings",
            "Threshold crossings recorded, by feature and threshold percent.",
            ["feature_key", "threshold"],
            registry=registry,
        )
        self.active = Gauge(
            "metering_aggregator_active",
            "1 while this aggregator leads (runs passes, publishes), 0 while it stands by.",
            registry=registry,
        )
        self.meter_skipped = Counter(
            "metering_meter_skipped",
            "Events a meter read the type of but could not count (value path missing, not "
            "a number, a dimension over 128 characters), by meter and reason.",
            ["meter", "reason"],
            registry=registry,
        )
        self.meter_pass_seconds = Histogram(
            "metering_meter_pass_seconds",
            "Duration of one meter pass (the meters that are not builtin; one transaction).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.meter_pairs = Counter(
            "metering_meter_events_read",
            "(event, meter) pairs read by the meter passes.",
            registry=registry,
        )
        self.meter_watermark_lag = Gauge(
            "metering_meter_watermark_lag_seconds",
            "Age of the oldest stored event the meter passes have not counted (0 when caught up).",
            registry=registry,
        )
        self.backfilled = Counter(
            "metering_meter_backfilled_events",
            "Stored events counted by the backfill of new meters.",
            registry=registry,
        )
        self.published = Counter(
            "metering_limit_notifications_published",
            "Threshold crossings published to the limits topic.",
            registry=registry,
        )


class WebhookMetrics:
    """The webhook deliverer's (metering webhooks deliver, or inside metering run)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.dependencies = DependencyMetrics(registry)
        self.deliveries = Counter(
            "metering_webhook_deliveries",
            "Webhook messages finished, by result (delivered, or failed after 24 h of retries).",
            ["result"],
            registry=registry,
        )
        self.attempts = Counter(
            "metering_webhook_attempts",
            "Webhook delivery attempts, by outcome (success: a 2xx answer; error: any other "
            "answer, a timeout, a refused address).",
            ["outcome"],
            registry=registry,
        )
        self.attempt_seconds = Histogram(
            "metering_webhook_attempt_seconds",
            "Time of one delivery attempt, from resolving the host to the answer's status.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.pending = Gauge(
            "metering_webhook_pending",
            "Webhook deliveries not delivered or given up yet.",
            registry=registry,
        )
        self.oldest_undelivered = Gauge(
            "metering_webhook_oldest_undelivered_seconds",
            "Age of the oldest webhook delivery still pending (0 when none is).",
            registry=registry,
        )
