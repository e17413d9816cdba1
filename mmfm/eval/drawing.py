"""The report's figures drawn in a process of their own.

Matplotlib holds Python's global interpreter lock (GIL) for all of a figure's drawing and PNG encoding (~0.1 s
each, ~30 in a demo's report), and a UMAP projection holds it for its numba compile. Drawn in the probe's threads they
stall its fits and XLA dispatches; drawn at its end they add their whole time to the run's. A `Drawer` hands each
figure (a module-level drawing function of mmfm and its arguments: arrays and tables) to one worker process that
draws while the probe goes on: the same files, written atomically as before. Without a Drawer (`draw(None, …)`, the
library default) figures are drawn in the calling thread.

The worker is a fresh interpreter (`python -c`, not a fork: the caller runs JAX's threads; not multiprocessing's
spawn either, which would run the caller's main script again) that imports the drawing code as it starts, beside the
caller's work. Jobs and answers are pickled over its stdin/stdout — between this process and its own child, never
from a file. It exits when its stdin closes, so it never outlives the caller. `wait()` returns once every figure
submitted is written and raises the first drawing error with the worker's traceback.
"""

from __future__ import annotations

import importlib
import pickle
import queue
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding this mmfm package
PRELOAD = "mmfm.eval.report"  # what the figures need (matplotlib, pandas, scikit-survival: ~1-2 s), imported at start


class DrawingError(RuntimeError):
    """A figure the worker could not draw (its traceback in the message)."""


class Drawer:
    """Figures drawn by one worker process, in submission order; safe to submit from several threads."""

    def __init__(self, preload: str = PRELOAD):
        command = (f"import sys; root = {_PACKAGE_ROOT!r}; sys.path[:0] = [] if root in sys.path else [root]; "
                   f"from mmfm.eval.drawing import serve; serve({preload!r})")  # this very mmfm, wherever it is
        self._proc = subprocess.Popen([sys.executable, "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._jobs: queue.Queue = queue.Queue()
        self._sent = 0
        self._lock = threading.Lock()
        # a job's arguments can exceed the pipe's buffer while the worker draws: a thread writes, submit never blocks
        self._feeder = threading.Thread(target=self._feed, name="drawer-feed", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._proc.stdin.write(job)
                self._proc.stdin.flush()
            except BrokenPipeError:  # the worker died: wait() reports it
                return

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        job = pickle.dumps((fn.__module__, fn.__qualname__, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self._sent += 1
            self._jobs.put(job)

    def wait(self) -> None:
        """Block until every submitted figure is drawn; the first error is raised once all are answered."""
        with self._lock:
            n, self._sent = self._sent, 0
        errors = []
        for _ in range(n):
            try:
                answer = pickle.load(self._proc.stdout)
            except EOFError:
                raise DrawingError(f"the drawing process exited (code {self._proc.wait()}) before drawing every "
                                   "figure; its error is above") from None
            if answer is not None:
                errors.append(answer)
        if errors:
            raise DrawingError(f"{len(errors)} figure(s) failed; the first:\n{errors[0]}")

    def close(self, cancel: bool = False) -> None:
        """Let the worker finish what was submitted and exit (`cancel`: stop it now, figures left undrawn). With
        every figure answered there is nothing left to finish: stopped, not waited through its interpreter's exit."""
        with self._lock:
            idle = self._sent == 0
        if cancel or idle:
            self._proc.kill()
        self._jobs.put(None)
        self._feeder.join()
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        self._proc.wait()
        self._proc.stdout.close()

    def __enter__(self) -> Drawer:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(cancel=exc_type is not None)  # the run failed: its figures are not wanted


def draw(drawer: Drawer | None, fn: Callable, *args, **kwargs) -> None:
    """`fn(*args, **kwargs)` by `drawer`'s process, or here and now without one."""
    if drawer is None:
        fn(*args, **kwargs)
    else:
        drawer.submit(fn, *args, **kwargs)


def serve(preload: str) -> None:
    """The worker: import `preload`, then draw each job read from stdin and answer None or the error's traceback on
    stdout, until EOF."""
    jobs, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a drawing function's prints must not corrupt the answers
    importlib.import_module(preload)  # while the caller works, before the first figure is asked

    while True:
        try:
            module, name, args, kwargs = pickle.load(jobs)
        except EOFError:
            return
        try:
            fn = importlib.import_module(module)
            for part in name.split("."):
                fn = getattr(fn, part)
            fn(*args, **kwargs)
            answer = None
        except Exception:
            answer = traceback.format_exc()
        pickle.dump(answer, answers)
        answers.flush()
