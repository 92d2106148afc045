"""Meters: definitions (pure), the accepted types registry, storage."""
