"""Plain SQL migrations, applied in file-name order, each in one transaction, recorded."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import asyncpg

from metering.errors import MigrationError

CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name        text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""
# Two migrators started at once must not both apply the same file.
LOCK_MIGRATIONS = "SELECT pg_advisory_xact_lock(hashtext('metering.migrations'))"
SELECT_APPLIED = "SELECT name, checksum FROM schema_migrations"
RECORD_APPLIED = "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)"


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def bundled_migrations() -> list[Migration]:
    """The `.sql` files shipped in `metering/migrations`, in the order they apply."""
    folder = resources.files("metering") / "migrations"
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")), key=lambda e: e.name
    )
    return [Migration(entry.name, entry.read_text(encoding="utf-8")) for entry in files]


async def migrate(conn: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[str]:
    """Apply every migration not applied yet; return the names applied now.

    Raises `MigrationError` if a file fails (nothing of it stays) or if an applied file
    was edited afterwards (its checksum changed): write a new migration instead.
    """
    pending_all = migrations if migrations is not None else bundled_migrations()
    await conn.execute(CREATE_MIGRATIONS_TABLE)
    applied_now: list[str] = []
    for migration in pending_all:
        async with conn.transaction():
            await conn.execute(LOCK_MIGRATIONS)
            applied = {row["name"]: row["checksum"] for row in await conn.fetch(SELECT_APPLIED)}
            if migration.name in applied:
                if applied[migration.name] != migration.checksum:
                    raise MigrationError(
                        migration.name, "already applied with different contents; add a new file"
                    )
                continue
            try:
                await conn.execute(migration.sql)
            except asyncpg.PostgresError as error:
                raise MigrationError(migration.name, str(error)) from error
            await conn.execute(RECORD_APPLIED, migration.name, migration.checksum)
            applied_now.append(migration.name)
    return applied_now
