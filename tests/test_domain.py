"""The domain kernel's arithmetic, checked over generated inputs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.domain.model import BatchStatus, request_counts

counts = st.integers(min_value=-5, max_value=10**6)
maybe = st.none() | counts


@given(st.sampled_from(list(BatchStatus)), st.integers(min_value=0, max_value=10**5), counts, counts, maybe, maybe)
def test_request_counts_never_contradict_total(status: BatchStatus, total: int, completed: int, failed: int,
                                               provider_completed: int | None, provider_failed: int | None) -> None:
    shown_completed, shown_failed = request_counts(status, total, completed, failed, provider_completed,
                                                   provider_failed)
    assert 0 <= shown_completed and 0 <= shown_failed and shown_completed + shown_failed <= total


def test_a_provider_reporting_more_lines_than_the_batch_has_is_clamped() -> None:
    """Issue #9's case: a 3-line batch with the provider saying 95 completed and 5 failed."""
    assert request_counts(BatchStatus.IN_PROGRESS, 3, 0, 0, 95, 5) == (3, 0)


def test_live_provider_counts_show_progress_until_the_batch_ends() -> None:
    assert request_counts(BatchStatus.IN_PROGRESS, 10, 0, 0, 4, 1) == (4, 1)
    # Once ended, only stored results count: they are what a caller can page.
    assert request_counts(BatchStatus.COMPLETED, 10, 7, 2, 9, 1) == (7, 2)
