"""The base class of our tasks: argument shapes, retries of transient faults, dead letters.

Every final failure ends in `dead_letter` (written in a short transaction of its own, after the
task's Session was rolled back and closed) and then FAILURE with the same message.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from celery import Task
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from worker import store
from worker.db import task_db
from worker.errors import InvalidPayloadError, PermanentError, TransientError, one_line
from worker.settings import settings

logger = logging.getLogger(__name__)

# SQLSTATEs worth retrying: serialization failure, deadlock, too many connections, and the
# server shutting down or starting up; class 08 is any connection exception.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "53300", "57P01", "57P02", "57P03"}


def is_transient(exc: BaseException) -> bool:
    """Whether a database error may pass if the task runs again later."""
    if isinstance(exc, TransientError | sa_exc.TimeoutError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated or isinstance(exc, sa_exc.OperationalError):
            return True
        code = getattr(exc.orig, "pgcode", None) or ""
        return code in _TRANSIENT_SQLSTATES or code.startswith("08")
    return False


def backoff(retries: int) -> float:
    """Seconds before retry number `retries` + 1: full jitter up to min(2^retries, the cap)."""
    return get_exponential_backoff_interval(
        factor=1, retries=retries, maximum=settings.retry_backoff_max, full_jitter=True
    )


def log_retry(
    retry: int, countdown: float, error: Exception, dead_letter_too: bool = False
) -> None:
    """The warning of a transient fault: which retry, after how long, and why."""
    logger.warning(
        "transient fault, retry %d in %ss: %s%s",
        retry,
        countdown,
        error,
        " (the dead letter too)" if dead_letter_too else "",
    )


class WritingSessionsTask(Task):
    """Base of the writing_sessions.* tasks."""

    # Celery would reject a wrong argument shape before our code runs, with no dead letter;
    # __call__ checks the shape itself and names the argument instead.
    typing = False
    # Bad input is an expected failure: logged as one line, without a traceback.
    throws = (PermanentError,)
    max_retries = settings.max_retries
    retry_backoff_max = settings.retry_backoff_max

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            self.check_arguments(args, kwargs)
            return self.run(*args, **kwargs)
        except PermanentError as exc:
            self._dead_letter(exc, args, kwargs)
            raise
        except Exception as exc:
            if not is_transient(exc):
                # A bug, not bad input: keep the message for a replay once it is fixed.
                self._dead_letter(exc, args, kwargs)
                raise
            self._retry_or_dead_letter(exc, args, kwargs)
            raise  # not reached: the line above always raises

    @cached_property
    def _signature(self) -> inspect.Signature:
        # A task object lives as long as its process: inspect the signature once.
        return inspect.signature(self.run)

    def check_arguments(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The arguments by parameter name; InvalidPayloadError names a wrong shape."""
        try:
            return dict(self._signature.bind(*args, **kwargs).arguments)
        except TypeError as exc:
            expected = ", ".join(self._signature.parameters)
            raise InvalidPayloadError(f"arguments: {exc} (expected: {expected})") from None

    def _retry_or_dead_letter(
        self, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        retries = self.request.retries
        error = TransientError(one_line(exc))
        if self.max_retries is None or retries < self.max_retries:
            countdown = backoff(retries)
            log_retry(retries + 1, countdown, error)
            raise self.retry(exc=error, countdown=countdown) from exc
        try:
            self._dead_letter(error, args, kwargs)
        except Exception as letter_exc:
            if not is_transient(letter_exc):
                raise
            # The database still refuses even the dead letter: keep the message on the broker
            # rather than drop it, and try again at the backoff cap.
            log_retry(retries + 1, self.retry_backoff_max, error, dead_letter_too=True)
            # (max_retries=None would mean the task's own limit, which is spent: the limit of
            # this one retry is one more than the retries so far.)
            raise self.retry(
                exc=error, countdown=self.retry_backoff_max, max_retries=retries + 1
            ) from letter_exc
        raise error from exc

    def _dead_letter(self, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # A short transaction of its own: the task's Session has already been rolled back.
        with task_db() as db:
            self.add_dead_letter(db, args=args, kwargs=kwargs, error=exc)

    def add_dead_letter(
        self, db: Session, *, args: Sequence[Any], kwargs: dict[str, Any], error: Exception
    ) -> None:
        """Record this run's arguments (or one rejected item of them) in `dead_letter`."""
        letter = store.add_dead_letter(
            db,
            task_name=self.name,
            task_id=self.request.id,
            args=args,
            kwargs=kwargs,
            error_type=type(error).__name__,
            error=str(error),
            attempts=self.request.retries + 1,
        )
        logger.warning(
            "dead letter %s for task %s[%s]: %s", letter.id, self.name, self.request.id, error
        )
