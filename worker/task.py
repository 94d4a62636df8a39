"""The base class of our tasks, and the one decision on a message whose run raised.

`settle_failure` decides for both paths, a task run alone and a message of a group
(worker/group_runner.py): bad input or a bug is a dead letter and FAILURE; a transient fault is
retried with backoff by Celery's own Task.retry, honouring the task's options (max_retries,
retry_backoff_max, autoretry_for), and a dead letter once the retries are spent. Every dead letter
is written in a short transaction of its own, after the failed Session was rolled back and
closed. A dead letter the database refuses keeps the message on the broker instead (a retry at
the backoff cap), and a retry that cannot be published puts it back on its queue: nothing is
acknowledged unkept.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery import Task, states
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from worker import store
from worker.db import task_db
from worker.errors import InvalidPayloadError, PermanentError, TransientError, one_line
from worker.settings import settings

logger = logging.getLogger(__name__)

# SQLSTATEs worth retrying: serialization failure, deadlock, too many connections, the server
# shutting down or starting up, and a read-only transaction (a server that is, or has just
# become, a standby: what a failover looks like from a client); class 08 is any connection
# exception.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "53300", "57P01", "57P02", "57P03", "25006"}


def is_transient(exc: BaseException, task: Any = None) -> bool:
    """Whether a fault may pass if the message runs again later (a time limit counts: the
    database was slow or a row was locked); `task`'s autoretry_for counts too."""
    if isinstance(
        exc, TransientError | sa_exc.TimeoutError | SoftTimeLimitExceeded | TimeLimitExceeded
    ):
        return True
    autoretry_for = tuple(getattr(task, "autoretry_for", None) or ())
    if autoretry_for and isinstance(exc, autoretry_for):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated or isinstance(exc, sa_exc.OperationalError):
            return True
        code = getattr(exc.orig, "pgcode", None) or ""
        return code in _TRANSIENT_SQLSTATES or code.startswith("08")
    return False


def backoff(retries: int, maximum: int | None = None) -> float:
    """Seconds before retry number `retries` + 1: full jitter up to min(2^retries, the cap)."""
    return get_exponential_backoff_interval(
        factor=1,
        retries=retries,
        maximum=settings.retry_backoff_max if maximum is None else maximum,
        full_jitter=True,
    )


def log_retry(
    retry: int, countdown: float, error: BaseException, dead_letter_too: bool = False
) -> None:
    """The warning of a transient fault: which retry, after how long, and why."""
    logger.warning(
        "transient fault, retry %d in %ss: %s%s",
        retry,
        countdown,
        error,
        " (the dead letter too)" if dead_letter_too else "",
    )


def settle_failure(
    task: Any, exc: BaseException, args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[str, BaseException]:
    """What becomes of a message whose run raised `exc`; `task.request` must be the message's.

    Returns (state, exception): (FAILURE, the error) once a dead letter holds the message,
    (RETRY, the Retry of Task.retry) once the retry is published, (REJECTED, a Reject that
    requeues) when even that cannot be published. The per-task path raises the exception; a
    group reports it.
    """
    retries = task.request.retries or 0
    if is_transient(exc, task):
        error: BaseException = TransientError(one_line(exc))
        if task.max_retries is None or retries < task.max_retries:
            countdown = backoff(retries, task.retry_backoff_max)
            return _retry(task, error, countdown)
    else:
        error = exc
    try:
        with task_db() as db:
            add_dead_letter(task, db, args=args, kwargs=kwargs, error=error)
    except Exception as letter_exc:
        # The database refuses even the dead letter: keep the message on the broker rather
        # than drop it, and try again at the backoff cap. (The task's own max_retries is spent
        # or irrelevant: the limit of this one retry is one more than the retries so far.)
        logger.warning("could not write the dead letter of %s: %s", task.request.id, letter_exc)
        return _retry(task, error, task.retry_backoff_max, retries + 1, dead_letter_too=True)
    return states.FAILURE, error


def _retry(
    task: Any,
    error: BaseException,
    countdown: float,
    max_retries: int | None = None,
    dead_letter_too: bool = False,
) -> tuple[str, BaseException]:
    try:
        retry = task.retry(exc=error, countdown=countdown, max_retries=max_retries, throw=False)
    except Exception as send_exc:
        # Task.retry says Reject(requeue=False) when it cannot publish: requeue instead.
        logger.warning("could not send the retry of %s: %s", task.request.id, send_exc)
        return states.REJECTED, Reject(f"retry not sent: {send_exc}", requeue=True)
    finally:
        task.__dict__.pop("override_max_retries", None)  # Task.retry leaves it on the task
    log_retry(task.request.retries + 1, countdown, error, dead_letter_too)
    return states.RETRY, retry


def add_dead_letter(
    task: Any, db: Session, *, args: Sequence[Any], kwargs: dict[str, Any], error: BaseException
) -> None:
    """Record the arguments of `task.request`'s message (or one rejected item of them)."""
    letter = store.add_dead_letter(
        db,
        task_name=task.name,
        task_id=task.request.id,
        payload={"args": list(args), "kwargs": kwargs},
        error_type=type(error).__name__,
        error=str(error),
        attempts=(task.request.retries or 0) + 1,
    )
    logger.warning(
        "dead letter %s for task %s[%s]: %s", letter.id, task.name, task.request.id, error
    )


class WritingSessionsTask(Task):
    """Base of the writing_sessions.* tasks."""

    # Celery would reject a wrong argument shape before our code runs, with no dead letter;
    # __call__ checks the shape itself and names the argument instead.
    typing = False
    # Celery's Strategy, but a message that cannot be a task request (a body that is not
    # [args, kwargs, embed], say) is a dead letter instead of the worker's end; with
    # group_messages, waiting messages run together (worker/celery_ext/group_commit.py).
    Strategy = "worker.celery_ext.group_commit:strategy"
    # A hard time limit is a failed attempt (retry, then dead letter) settled by the
    # group_runner in its `failed` mode, not FAILURE and an acknowledgement.
    Request = "worker.celery_ext.group_commit:Request"
    group_runner = "worker.group_runner:run_group"
    group_messages = False
    # Bad input is an expected failure: logged as one line, without a traceback.
    throws = (PermanentError,)
    max_retries = settings.max_retries
    retry_backoff_max = settings.retry_backoff_max

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            self.check_arguments(args, kwargs)
            return self.run(*args, **kwargs)
        except (Retry, Reject, Ignore):
            raise  # Celery's own signals to its trace
        except Exception as exc:
            _, error = settle_failure(self, exc, args, kwargs)
            if error is exc:
                raise
            raise error from exc

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


class GroupCommitTask(WritingSessionsTask):
    """A task whose waiting messages are written together (worker/group_runner.py), unless
    group commit is switched off (WRITING_SESSIONS_GROUP_COMMIT=0): then each message runs
    alone through this class's __call__, with a Session of its own."""

    group_messages = settings.group_commit
