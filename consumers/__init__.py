"""Kafka consumers: the usage-events writer (Kafka -> Postgres)."""
