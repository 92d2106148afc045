"""Limits shaped per organization (contract section 8): overrides of the plan's limits."""
