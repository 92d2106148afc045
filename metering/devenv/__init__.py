"""`metering dev up|down|status`: a real Kafka broker and a real PostgreSQL, no Docker."""
