"""Storage: every SQL statement of the service lives in this package or in migrations."""
