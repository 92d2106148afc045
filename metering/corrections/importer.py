"""Importing usage events from a file (contract section 10): JSON lines of section 1 events,
or CSV with those columns.

Every row goes through the consumer's own validator (`metering.models.parse_event`): a CSV
row is first written as the JSON event it stands for (the quantity and metadata cells as
JSON text, so `"5"` is no more a quantity here than on the wire). Good rows are published in
batches; a batch's position is recorded (`FILE.import-state`) only once the broker has
acknowledged all of it, so an interrupted import resumes after the last acknowledged batch,
and anything re-sent is dropped by the dedupe key: running an import twice stores nothing
twice. Bad rows go to `FILE.rejected` as JSON lines `{"line", "code", "reason", "row"}`.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import re
from collections.abc import Callable, Collection, Coroutine, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal

from metering.errors import InvalidEvent, MeteringError
from metering.event_json import decode_json
from metering.models import UsageEvent, parse_event

Format = Literal["jsonl", "csv"]
CSV_COLUMNS = ("id", "type", "org_id", "user_id", "quantity", "occurred_at", "metadata")
CSV_REQUIRED = frozenset({"id", "type", "org_id", "occurred_at"})
_JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
FINGERPRINT_BYTES = 1 << 20


class ImportFileError(MeteringError):
    """The file as a whole cannot be imported (unknown format, a CSV header with unknown or
    missing columns); nothing was published. `reason` says what to fix."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Row:
    """One row of the file: its line number (1-based; a CSV row's first line) and text."""

    line: int
    text: str
    original: str | None = None  # a CSV row as it was written (text is its JSON event)


@dataclass(frozen=True)
class Rejected:
    line: int
    code: str
    reason: str
    row: str

    def json_line(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False) + "\n"


def detect_format(path: Path, head: bytes) -> Format:
    """By the name (.csv; .jsonl, .ndjson, .json), else by the first character: `{` is JSON
    lines, anything else CSV."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in {".jsonl", ".ndjson", ".json"}:
        return "jsonl"
    return "jsonl" if head.lstrip().startswith(b"{") else "csv"


def fingerprint(path: Path) -> str:
    """Identifies the file for resuming: its first MiB's SHA-256."""
    with path.open("rb") as handle:
        return hashlib.sha256(handle.read(FINGERPRINT_BYTES)).hexdigest()


def rows(handle: IO[str], kind: Format, path: Path) -> Iterator[Row | Rejected]:
    """The file's rows as JSON event text (blank lines skipped); a CSV row that cannot
    be written as an event (bad metadata cell) comes out Rejected."""
    if kind == "jsonl":
        for number, physical in enumerate(handle, start=1):
            text = physical.rstrip("\r\n")
            if text.strip():
                yield Row(number, text)
        return
    reader = csv.reader(handle)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return
    unknown = [h for h in header if h not in CSV_COLUMNS]
    missing = sorted(CSV_REQUIRED - set(header))
    if unknown or missing or len(set(header)) != len(header):
        raise ImportFileError(
            path,
            f"the CSV header must name columns of {', '.join(CSV_COLUMNS)} (id, type, org_id "
            f"and occurred_at required, each once); unknown: {unknown or 'none'}, "
            f"missing: {missing or 'none'}",
        )
    start = reader.line_num + 1
    for cells in reader:
        line, start = start, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        original = _csv_line(cells)
        if len(cells) != len(header):
            yield Rejected(
                line, "bad_row", f"{len(cells)} cells for {len(header)} columns", original
            )
            continue
        try:
            yield Row(line, csv_event_json(dict(zip(header, cells, strict=True))), original)
        except InvalidEvent as error:
            yield Rejected(line, error.code, error.reason, original)


def _csv_line(cells: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(cells)
    return out.getvalue()


def csv_event_json(cells: dict[str, str]) -> str:
    """The JSON event a CSV row stands for. Empty `user_id`, `quantity` and `metadata` cells
    are left out (null, 1, none); a quantity cell must be a JSON number and a metadata
    cell a JSON object (raises InvalidEvent naming the cell otherwise)."""
    parts = [
        f"{json.dumps(name)}:{json.dumps(cells[name])}"
        for name in ("id", "type", "org_id", "occurred_at")
    ]
    user = cells.get("user_id", "").strip()
    if user:
        parts.append(f'"user_id":{json.dumps(user)}')
    quantity = cells.get("quantity", "").strip()
    if quantity:
        # a number cell is written as a JSON number; anything else stays a string, which
        # the validator refuses as it would on the wire
        parts.append(
            f'"quantity":{quantity if _JSON_NUMBER.fullmatch(quantity) else json.dumps(quantity)}'
        )
    metadata = cells.get("metadata", "").strip()
    if metadata:
        try:
            decode_json(metadata)
        except (ValueError, RecursionError) as error:
            raise InvalidEvent(
                "invalid_metadata", f"metadata: not JSON ({str(error)[:100]})", "metadata"
            ) from None
        parts.append(f'"metadata":{metadata}')
    return "{" + ",".join(parts) + "}"


def validate(
    row: Row,
    *,
    now: datetime,
    lateness_window: timedelta,
    future_tolerance: timedelta,
    known_types: Collection[str],
) -> UsageEvent | Rejected:
    """The consumer's verdict on one row: the event, or why it would be dead-lettered."""
    try:
        return parse_event(
            row.text.encode("utf-8", "surrogateescape"),
            now=now,
            lateness_window=lateness_window,
            future_tolerance=future_tolerance,
            known_types=known_types,
        )
    except InvalidEvent as error:
        return Rejected(row.line, error.code, error.reason, row.original or row.text)


@dataclass
class ImportState:
    """Where an import stands, saved after each acknowledged batch (FILE.import-state)."""

    fingerprint: str
    format: Format
    rows_done: int = 0  # rows (valid or not) fully handled, in file order
    published: int = 0
    rejected: int = 0
    rejected_bytes: int = 0  # the length of FILE.rejected that goes with rows_done

    @classmethod
    def load(cls, path: Path) -> ImportState | None:
        try:
            document = json.loads(path.read_text())
            return cls(**document)
        except (OSError, ValueError, TypeError):
            return None

    def save(self, path: Path) -> None:
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(asdict(self)))
        temporary.replace(path)  # atomic: a crash leaves the old state or the new one


def open_text(path: Path) -> io.TextIOWrapper:
    """The file as UTF-8 text (undecodable bytes kept as surrogates, so the row is
    rejected as not UTF-8 rather than the whole file)."""
    return open(path, encoding="utf-8", errors="surrogateescape", newline="")


Publish = Callable[[list[tuple[bytes, bytes]]], Coroutine[Any, Any, None]]


class FileImport:
    """Runs one import of `path` from `state`: validates rows with `judge`, writes the
    rejected ones to `rejected_path`, publishes the good ones with `publish` (which returns
    once Kafka acknowledged the whole batch), and saves the state after each acknowledged
    batch. One batch is in flight while the next is validated."""

    def __init__(
        self,
        path: Path,
        state: ImportState,
        *,
        resumed: bool,
        judge: Callable[[Row], UsageEvent | Rejected],
        publish: Publish,
        batch_size: int,
        on_progress: Callable[[int], None] = lambda line: None,
    ) -> None:
        self.path = path
        self.state = state
        self.resumed = resumed
        self.state_path = path.with_name(path.name + ".import-state")
        self.rejected_path = path.with_name(path.name + ".rejected")
        self._judge = judge
        self._publish = publish
        self._batch_size = batch_size
        self._on_progress = on_progress
        self._in_flight: tuple[asyncio.Task[None], ImportState] | None = None

    async def run(self) -> ImportState:
        """Import to the end; returns the final state. Raises ImportFileError (nothing
        published) or the publisher's error (the state saved says where to resume)."""
        done = self.state.rows_done
        progress = replace(self.state)
        with (
            open_text(self.path) as text,
            self.rejected_path.open(
                "r+b" if self.resumed and self.rejected_path.exists() else "wb"
            ) as rejected,
        ):
            rejected.truncate(self.state.rejected_bytes if self.resumed else 0)
            rejected.seek(0, 2)
            batch: list[tuple[bytes, bytes]] = []
            seen = 0
            for item in rows(text, self.state.format, self.path):
                seen += 1
                if seen <= done:
                    continue
                verdict = item if isinstance(item, Rejected) else self._judge(item)
                if isinstance(verdict, Rejected):
                    rejected.write(verdict.json_line().encode("utf-8", "surrogateescape"))
                    progress.rejected += 1
                elif isinstance(item, Row):
                    # the row's own JSON text, as validated (a CSV row: the event it stands for)
                    batch.append((verdict.partition_key(), item.text.encode("utf-8")))
                    progress.published += 1
                progress.rows_done = seen
                if len(batch) >= self._batch_size:
                    rejected.flush()
                    progress.rejected_bytes = rejected.tell()
                    await self._hand_over(batch, replace(progress))
                    batch = []
                    self._on_progress(item.line)
            rejected.flush()
            progress.rejected_bytes = rejected.tell()
            await self._hand_over(batch, replace(progress))
            await self._hand_over(None, None)
        return self.state

    async def _hand_over(
        self, batch: list[tuple[bytes, bytes]] | None, after: ImportState | None
    ) -> None:
        """Wait for the batch in flight and save its state; then send `batch`."""
        if self._in_flight is not None:
            task, state = self._in_flight
            self._in_flight = None
            await task
            self.state = state
            state.save(self.state_path)
        if batch is not None and after is not None:
            self._in_flight = (asyncio.create_task(self._publish(batch)), after)
