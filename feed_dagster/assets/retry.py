"""Step retries for transient failures, and the errors that must never be retried.

File and LanceDB I/O can fail for reasons that pass: a full or briefly unavailable disk,
an NFS hiccup, a LanceDB manifest committed by another writer a moment ago, the warehouse
held by another process past the reader's wait. Steps doing such I/O carry `IO_RETRY`.
Errors that say the data or the configuration is wrong fail the same way every time;
retrying them only delays the message, so `fail_fast` turns them into a non-retried
`dagster.Failure` that keeps the original error as its cause.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from feed_dagster.errors import DataValidationError, NoCandidatesError
from feed_dagster.models.store import CorruptModelError

# Two more attempts, 2 s then ~4 s apart (jittered so shards retried together spread out).
IO_RETRY = dg.RetryPolicy(
    max_retries=2, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)

DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    DataValidationError,
    NoCandidatesError,
    CorruptModelError,
)


@contextmanager
def fail_fast() -> Iterator[None]:
    """Raise errors that would repeat on every attempt as a Failure that is not retried."""
    try:
        yield
    except DETERMINISTIC_ERRORS as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
