"""`Forked(fn, *args)`: `fn(*args)` in a forked child process, its answer (or its error) collected later — work that
needs nothing the parent imports next runs on another core meanwhile (`mmfm demo` simulates its cohort while the
`mmfm` process imports JAX: `mmfm.cli.pipeline.cohort_ahead`).

Fork, not spawn: the child starts with the parent's modules instead of importing them again and runs the same code
on the same objects. A fork copies no other thread, so a lock another thread holds would stay locked in the child:
fork only while `can_fork()` (one thread; native libraries' threads — XLA's once JAX's backend starts — are not
counted, so fork before starting them). The answer comes back pickled over a pipe from our own child, never from a
file; an error comes back as its type, message and traceback, raised in the parent as a RuntimeError naming the
work. The child ends with the parent: `stop()` when the parent gives up on the answer (an error, an interrupt),
at exit (a daemon), and when the parent is killed (Linux `PR_SET_PDEATHSIG`); Ctrl-C ends it without a traceback.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback

PR_SET_PDEATHSIG = 1  # linux/prctl.h
try:  # looked up here, not in the child: a lookup takes the dynamic loader's lock, which a fork may leave locked
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: stop() and the daemon flag still end the child
    _PRCTL = None


def can_fork() -> bool:
    """Forking is safe (this process runs one Python thread) and can gain (a second core is ours)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ("fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1 and cores > 1)


class Forked:
    """`fn(*args)` running in a forked child (`pid`) from construction; `result()` waits for it, `stop()` ends it.
    `wall` and `cpu`: the child's seconds, once `result()` returned; `answered`: whether it did (or raised)."""

    def __init__(self, what: str, fn, *args):
        ctx = multiprocessing.get_context("fork")
        self.what, self.wall, self.cpu, self.answered = what, 0.0, 0.0, False
        self._answer, send = ctx.Pipe(duplex=False)
        for stream in (sys.stdout, sys.stderr):  # else the child would print the parent's buffered text again
            stream.flush()
        self._child = ctx.Process(target=_run, args=(send, os.getpid(), fn, args), daemon=True,
                                  name=f"mmfm: {what}")
        self._child.start()
        self.pid = self._child.pid
        send.close()  # the child's end only: EOF once it exits, even without an answer

    def result(self):
        """The child's answer (waiting for it); its error raised here as a RuntimeError naming `what`."""
        try:
            ok, value, self.wall, self.cpu = self._answer.recv()
        except EOFError:
            self.answered = True
            self._child.join()
            code = self._child.exitcode
            why = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else
                   f"exited with code {code} without an answer")
            raise RuntimeError(f"{self.what} failed in a child process: {why}") from None
        finally:
            self._answer.close()
        self.answered = True
        self._child.join()
        if ok:
            return value
        kind, message, trace = value
        error = RuntimeError(f"{self.what} failed in a child process: {kind}: {message}")
        error.add_note(f"the child's traceback:\n{trace}")
        raise error

    def stop(self) -> None:
        """End the child if it still runs (SIGTERM) and reap it: the parent gives up on an answer not yet taken."""
        self._child.terminate()
        self._child.join()
        self._answer.close()


def _run(send, parent: int, fn, args) -> None:
    """The child: die with the parent, run `fn`, send (ok, answer or error, wall, cpu) and exit."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C or stop(): end quietly, the parent reports
        signal.signal(sig, signal.SIG_DFL)
    _die_with(parent)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        answer = (True, fn(*args))
    except Exception as e:
        answer = (False, (type(e).__name__, str(e), traceback.format_exc()))
    for stream in (sys.stdout, sys.stderr):  # its lines before the parent's next
        stream.flush()
    send.send((*answer, time.perf_counter() - t0, time.process_time() - c0))
    send.close()


def _die_with(parent: int) -> None:
    """SIGTERM when the parent exits, however it exits (Linux)."""
    if _PRCTL is None:
        return
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)
