"""Pre-emption: a stop signal ends the run at a step boundary with a checkpoint, never mid-step.

SLURM (pre-emption, `--signal`), Kubernetes/GKE (pod eviction) and TPU maintenance send SIGTERM, a terminal
sends SIGINT, submitit's time-out warning is SIGUSR2 and Lightning-style SLURM scripts use SIGUSR1: during the
training loop all four mean "finish the current step, write a checkpoint with the loader state, exit with
`EXIT_PREEMPTED`" (75, EX_TEMPFAIL: the job is fine and should be re-queued; the launch kits re-queue on it).
A second Ctrl-C interrupts at once.

Several processes must stop at the *same* step, or the next step's collectives hang. With `jax.distributed`
initialised, the decision is JAX's preemption service (`multihost_utils.reached_preemption_sync_point`): the
coordination service hears a SIGTERM on any process and agrees with every process on the first step all can
still reach. JAX listens for SIGTERM itself, so SIGTERM is left to it and the other signals are re-sent to this
process as SIGTERM to join the same protocol. JAX's notifier looks for the signal once a second, so a process that
caught SIGINT/SIGUSR1/SIGUSR2 waits at its next step boundary until every process has reported its step to the
protocol: the stop then lands on the first step after the fastest process's, not a second of steps later (and
a signal delivered at step N on every process stops all of them after step N exactly). A single process just
reads its flag.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

EXIT_PREEMPTED = 75
COUNTERS_KEY = "PREEMPTION_CURRENT_COUNTER/"  # where JAX's sync protocol collects each process's step (XLA's tsl)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """The run stopped on a signal after checkpointing `step`; resume with `--resume auto`."""

    def __init__(self, step: int, signal_name: str, run_dir):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {step} written to {run_dir}; "
                         f"continue with --resume auto")
        self.step, self.signal_name, self.run_dir = step, signal_name, run_dir


def _distributed() -> bool:
    import jax

    return jax.distributed.is_initialized()


def _await_counters(timeout_s: float = 60.0) -> None:
    """Block until every process has given JAX's sync protocol its step (the protocol then holds the lock that
    `reached_preemption_sync_point` takes, so the next call sees the agreed step)."""
    import jax
    from jax._src import distributed

    client, n = distributed.global_state.client, jax.process_count()
    deadline = time.monotonic() + timeout_s
    while len(client.key_value_dir_get(COUNTERS_KEY)) < n:
        if time.monotonic() > deadline:  # a JAX without this key: the stop comes later, still agreed
            logging.warning("preemption sync: no step reports from every process after %.0f s", timeout_s)
            return
        time.sleep(0.01)


class StopRequest:
    """Context manager around the training loop: installs the handlers, restores the previous ones on exit.

    `should_stop(step)` must be called once per step, with increasing steps, on every process.
    `received` names the signal (None while none came); outside the main thread nothing is installed.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: str | None = None
        self._previous: dict = {}
        self._multi = False
        self._reported = False

    def __enter__(self):
        self._multi = _distributed()
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            if self._multi and sig == signal.SIGTERM:
                continue  # JAX's preemption notifier owns SIGTERM
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.received = self.received or signal.Signals(signum).name
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)  # into JAX's preemption protocol

    def should_stop(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            if self.received is not None and not self._reported:
                _await_counters()
                self._reported = True
            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.received or "SIGTERM"
                return True
            return False
        return self.received is not None
