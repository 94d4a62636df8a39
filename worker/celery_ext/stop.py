"""A SIGTERM sent to every process of a prefork worker stops it warmly, as one sent to its main.

systemd (`KillMode=control-group`, its default), `timeout`, `tini -g` and `kill -- -PGID` signal
the whole process group or cgroup at once. Celery's main process takes SIGTERM for a warm
shutdown: stop consuming, let the pool finish what it runs, return what it holds. But the pool
children get the same SIGTERM, and billiard's handler in a child raises SystemExit wherever the
child is: the task it runs is cut short (and redelivered), and a child that dies while it holds
the pool's shared queue lock leaves the main process waiting for that lock forever
(billiard's `Pool._help_stuff_finish`); only `kill -9` ends it.

So each child blocks SIGTERM and takes it on a thread of its own with `sigwaitinfo`, which says
who sent it. From the main process (a hard time limit, `revoke(terminate=True)` or Flower's
"Terminate", a pool that shrinks) it goes on to the main thread, to billiard's handler, as
before. From anyone else it is left to the main process, which got it too: the child finishes
its task and leaves when the warm shutdown closes the pool. SIGKILL still ends anything.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import threading
from typing import Any

from celery import signals

logger = logging.getLogger(__name__)

_main_pid: int | None = None


@signals.worker_init.connect
def _remember_the_main_process(**_: Any) -> None:
    global _main_pid
    _main_pid = os.getpid()


@signals.worker_process_init.connect
def _leave_foreign_sigterm_to_the_main_process(**_: Any) -> None:
    # worker_process_init runs in the main process too with the solo pool: it keeps SIGTERM.
    if _main_pid is None or os.getpid() == _main_pid:
        return
    parent = os.getppid()
    # Before any other thread starts, so that every thread of the child inherits the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_take_sigterm, args=(parent,), name="sigterm", daemon=True).start()


def _take_sigterm(parent: int) -> None:
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender == parent:
            # Runs the main thread's SIGTERM handler (billiard's) as the signal itself would.
            _thread.interrupt_main(signal.SIGTERM)
        else:
            logger.info(
                "SIGTERM from pid %d left to the main process: this child stops when the pool "
                "closes",
                sender,
            )
