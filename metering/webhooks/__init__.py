"""Webhooks (contract section 9): endpoints, signed messages (Standard Webhooks), and their
delivery, at least once, from an outbox in PostgreSQL."""
