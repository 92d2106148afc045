"""The aggregator: usage_events -> usage_aggregations, and limit threshold crossings."""
