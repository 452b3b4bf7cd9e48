"""The embedded default (SQLite) under a small team's burst: 100 clients upload a file and create
a batch from it at the same moment, through Envoy, while another tenant reads. Before writers were
serialised in-process, 20 such creates gave 17 HTTP 500s (`database is locked`, pool exhausted)
and stalled the other tenant for 30 s. bench/concurrency.py measures the same with timings."""

from __future__ import annotations

from tests.e2e import Stack, sqlite_stack_fixture  # noqa: F401  (the fixture `sqlite_stack`)
from tests.load import concurrent_creates


def test_100_concurrent_uploads_and_creates_on_sqlite(sqlite_stack: Stack) -> None:
    report = concurrent_creates(sqlite_stack, clients=100, lines=20)
    assert report.uploads.statuses == {200: 100}, (report.uploads.describe(), report.uploads.errors[:3])
    assert report.creates.statuses == {200: 100}, (report.creates.describe(), report.creates.errors[:3])
    # The other tenant was served all along: every read answered, none failed.
    assert report.reads and set(report.read_statuses) == {200}, report.read_summary()
