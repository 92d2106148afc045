"""Usage metering: every usage event stored exactly once, rolled up, checked against limits."""

__version__ = "0.1.0"
