"""The schema: versioned migrations for tables and data, repeatable definitions for code.

Two kinds of plain SQL file, applied by `migrate` (Flyway's scheme of versioned and
repeatable migrations):

- `metering/migrations/NNN_*.sql`, **versioned**: tables, columns, indexes, policies, data.
  Each is applied once, in name order, in one transaction, and recorded with its checksum;
  a released file is never edited (an edited one is refused), a change is a new file. The
  function bodies some of them contain are history: what runs is the definition below.
- `metering/schema/*.sql` and `aggregator/schema/*.sql`, **repeatable**: the one current
  definition of every function (`CREATE OR REPLACE`, settings and grants included), one
  file per area, kept by the package that calls it. After the
  versioned files, all of them are applied again, in name order and in one transaction,
  whenever one of them changed or a versioned file was applied: so a function's live body is
  the text of its file, whatever the history of the database.
"""

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
CREATE_DEFINITIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_definitions (
    name        text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""
SELECT_DEFINITIONS = "SELECT name, checksum FROM schema_definitions"
RECORD_DEFINITIONS = """
INSERT INTO schema_definitions (name, checksum)
SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, applied_at = now()
"""
FORGET_DEFINITIONS = "DELETE FROM schema_definitions WHERE NOT (name = ANY($1::text[]))"


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


# Packages whose `schema/` folder holds repeatable definitions: each area owns its SQL (the
# aggregator's pass, recompute and limit checks ship with it). Read as package data by name;
# no code of those packages is imported here.
DEFINITION_PACKAGES = ("metering", "aggregator")


def _sql_files(folder_name: str, packages: tuple[str, ...] = ("metering",)) -> list[Migration]:
    entries = [
        entry
        for package in packages
        for entry in (resources.files(package) / folder_name).iterdir()
        if entry.name.endswith(".sql")
    ]
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise MigrationError(folder_name, f"two packages ship a file of the same name: {names}")
    return [
        Migration(entry.name, entry.read_text(encoding="utf-8"))
        for entry in sorted(entries, key=lambda e: e.name)
    ]


def bundled_migrations() -> list[Migration]:
    """The versioned `.sql` files shipped in `metering/migrations`, in the order they apply."""
    return _sql_files("migrations")


def bundled_definitions() -> list[Migration]:
    """The repeatable `.sql` files of every package's `schema/` folder (`metering/schema`,
    `aggregator/schema`), in the order of their names (which says the order they apply)."""
    return _sql_files("schema", DEFINITION_PACKAGES)


async def migrate(
    conn: asyncpg.Connection,
    migrations: list[Migration] | None = None,
    definitions: list[Migration] | None = None,
) -> list[str]:
    """Apply every versioned migration not applied yet, then the repeatable definitions if
    any changed (or a migration was applied); return the names applied now.

    Raises `MigrationError` if a file fails (nothing of it stays) or if an applied versioned
    file was edited afterwards (its checksum changed): write a new migration instead.
    """
    applied_now = await _apply_versioned(
        conn, migrations if migrations is not None else bundled_migrations()
    )
    if definitions is None and migrations is not None:
        return applied_now  # a caller applying its own migrations only (tests)
    return applied_now + await _apply_definitions(
        conn,
        definitions if definitions is not None else bundled_definitions(),
        force=bool(applied_now),
    )


async def _apply_definitions(
    conn: asyncpg.Connection, definitions: list[Migration], *, force: bool
) -> list[str]:
    """All of `definitions`, in one transaction, when one differs from what was applied
    last (or `force`); none otherwise. A definition dropped from the package is forgotten
    (the object it defined is dropped by the versioned migration that retires it)."""
    await conn.execute(CREATE_DEFINITIONS_TABLE)
    async with conn.transaction():
        await conn.execute(LOCK_MIGRATIONS)
        recorded = {row["name"]: row["checksum"] for row in await conn.fetch(SELECT_DEFINITIONS)}
        current = {d.name: d.checksum for d in definitions}
        if not force and recorded == current:
            return []
        for definition in definitions:
            try:
                await conn.execute(definition.sql)
            except asyncpg.PostgresError as error:
                raise MigrationError(definition.name, str(error)) from error
        names = [d.name for d in definitions]
        await conn.execute(RECORD_DEFINITIONS, names, [d.checksum for d in definitions])
        await conn.execute(FORGET_DEFINITIONS, names)
        return names


async def _apply_versioned(conn: asyncpg.Connection, pending_all: list[Migration]) -> list[str]:
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
