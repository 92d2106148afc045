"""The local PostgreSQL: Debian's package, a cluster under the project's dev folder."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import asyncpg

from metering.config import Settings, child_environment
from metering.devenv.process import port_open, read_pid, say
from metering.errors import DevEnvironmentError

POSTGRES_MIN_MAJOR = 15


class PostgresService:
    """`DevServices`' PostgreSQL half (it provides `settings` and `pg_dir`)."""

    settings: Settings
    pg_dir: Path

    def postgres_bin(self) -> Path:
        """Debian's PostgreSQL server binaries, installed with apt-get when missing (as root)."""
        found = self._find_postgres_bin()
        if found is not None:
            return found
        if os.geteuid() != 0:
            raise DevEnvironmentError(
                "PostgreSQL server not installed: run apt-get install postgresql"
            )
        say("installing Debian's postgresql package (apt-get)")
        env = child_environment({"DEBIAN_FRONTEND": "noninteractive"})
        for command in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "postgresql"],
        ):
            result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if result.returncode != 0:
                raise DevEnvironmentError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        found = self._find_postgres_bin()
        if found is None:
            raise DevEnvironmentError("postgresql installed but no server binaries found")
        return found

    @staticmethod
    def _find_postgres_bin() -> Path | None:
        candidates = []
        for entry in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"):
            with contextlib.suppress(ValueError):
                major = int(entry.parent.parent.name)
                if major >= POSTGRES_MIN_MAJOR:
                    candidates.append((major, entry.parent))
        return max(candidates)[1] if candidates else None

    def _as_postgres_user(self, command: list[str]) -> list[str]:
        # initdb and postgres refuse to run as root; the Debian package creates `postgres`.
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *command]
        return command

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    @property
    def pg_log(self) -> Path:
        return self.pg_dir / "postgres.log"

    def postgres_running(self) -> int | None:
        return (
            read_pid(self.pg_data / "postmaster.pid")
            if (self.pg_data / "postmaster.pid").exists()
            else None
        )

    def start_postgres(self) -> None:
        """Create the cluster once, start it on 127.0.0.1, create the service database."""
        port = self.settings.database_port
        if not self.postgres_running():
            if port_open(port):
                raise DevEnvironmentError(
                    f"port {port} is taken by a PostgreSQL dev up did not start; stop it "
                    "(e.g. service postgresql stop) or point METERING_DATABASE_URL elsewhere"
                )
            bin_dir = self.postgres_bin()
            self.pg_dir.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(self.pg_dir, "postgres", "postgres")
            socket_dir = self.pg_dir / "socket"
            if not (self.pg_data / "PG_VERSION").exists():
                say(f"creating a PostgreSQL cluster in {self.pg_data}")
                result = subprocess.run(
                    self._as_postgres_user(
                        [
                            str(bin_dir / "initdb"),
                            "-D",
                            str(self.pg_data),
                            "-U",
                            "postgres",
                            "--auth=trust",
                            "-E",
                            "UTF8",
                            "--locale=C",
                        ]
                    ),
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if result.returncode != 0:
                    raise DevEnvironmentError(f"initdb failed:\n{result.stdout}{result.stderr}")
            subprocess.run(self._as_postgres_user(["mkdir", "-p", str(socket_dir)]), check=True)
            options = (
                f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={socket_dir} "
                "-c max_connections=200 -c shared_buffers=256MB -c fsync=on "
                "-c synchronous_commit=on -c max_wal_size=4GB -c checkpoint_timeout=15min"
            )
            say(f"starting PostgreSQL on 127.0.0.1:{port} (log: {self.pg_log})")
            result = subprocess.run(
                self._as_postgres_user(
                    [
                        str(bin_dir / "pg_ctl"),
                        "-D",
                        str(self.pg_data),
                        "-l",
                        str(self.pg_log),
                        "-o",
                        options,
                        "-w",
                        "-t",
                        "60",
                        "start",
                    ]
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                tail = (
                    self.pg_log.read_text(errors="replace")[-2000:] if self.pg_log.exists() else ""
                )
                raise DevEnvironmentError(
                    f"pg_ctl start failed:\n{result.stdout}{result.stderr}\n{tail}"
                )
        asyncio.run(self._ensure_database())

    async def _ensure_database(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = await asyncpg.connect(self.settings.admin_database_url(), timeout=5)
                break
            except (OSError, asyncpg.PostgresError) as error:
                if time.monotonic() > deadline:
                    raise DevEnvironmentError(
                        f"PostgreSQL does not accept connections: {error}"
                    ) from error
                await asyncio.sleep(0.2)
        try:
            name = self.settings.database_name
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                # CREATE DATABASE takes no parameters; the name is quoted as an identifier.
                quoted = await conn.fetchval("SELECT quote_ident($1)", name)
                await conn.execute(f"CREATE DATABASE {quoted}")
                say(f"created database {name}")
        finally:
            await conn.close()

    async def recreate_database(self) -> None:
        """Drop the service database if it exists, create it empty and apply every migration.

        For tests and benchmarks: everything in that database is lost.
        """
        from metering.storage.migrations import migrate

        admin = await asyncpg.connect(self.settings.admin_database_url())
        try:
            # CREATE/DROP DATABASE take no parameters; the name is quoted as an identifier.
            quoted = await admin.fetchval("SELECT quote_ident($1)", self.settings.database_name)
            await admin.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {quoted}")
        finally:
            await admin.close()
        conn = await asyncpg.connect(self.settings.database_url.get_secret_value())
        try:
            await migrate(conn)
        finally:
            await conn.close()

    def stop_postgres(self, *, mode: str = "fast") -> bool:
        """Stop the cluster `up` started (`fast`, or `immediate` to simulate a crash)."""
        if not self.postgres_running():
            return False
        bin_dir = self.postgres_bin()
        subprocess.run(
            self._as_postgres_user(
                [str(bin_dir / "pg_ctl"), "-D", str(self.pg_data), "-m", mode, "-w", "stop"]
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        return True
