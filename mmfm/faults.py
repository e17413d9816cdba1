"""Deterministic fault injection, a testing aid: a run delivers a signal to itself, raises or exits at a chosen point.

Process-level tests (pre-emption, kill + resume, a re-queue, a kill mid-write) must not race a subprocess from the
outside; instead the run is told where to fail through an environment variable, which crosses `subprocess`,
`jax.distributed` launchers and submitit jobs unchanged:

    MMFM_FAULTS="train.step@4:SIGTERM"                  # after step 4 is dispatched, before the stop check
    MMFM_FAULTS="checkpoint.save@6:SIGKILL"             # inside orbax's save of step 6, before it is committed
    MMFM_FAULTS="write:cases.csv@1:SIGKILL,write:*.h5@3:raise"   # the 1st cases.csv / 3rd .h5 atomic write, before
                                                        # its rename (`mmfm.io.atomic_path`)

A spec is `POINT@N:ACTION`, several joined by commas. POINT is a name or a glob (fnmatch) over the names the code
passes to `point`; N is the step the code passes (train.step, checkpoint.save) or, for points without one, the N-th
time this process reaches a matching point. ACTION is a signal delivered to this process (SIGTERM, SIGINT,
SIGUSR1, SIGUSR2, SIGKILL; from the main thread its handler has run when `point` returns), `raise`
(`InjectedFault`) or `exit` / `exit=CODE` (`os._exit`, no clean-up: a crash). Each spec fires at most once per
process; a resumed run starts past the step it stopped at, so a step fault never fires twice in one run. Unset,
`point` is a single `None` check.

`MMFM_FAULTS_TRACE=FILE` appends every point this process reaches to FILE, one `name@at` line each (`at`: the step,
or the hit count for points without one) — the menu from which a kill harness draws its points
(`mmfm.testing.kill_points`).
"""

from __future__ import annotations

import fnmatch
import os
import re
import signal
from dataclasses import dataclass

ENV = "MMFM_FAULTS"
TRACE_ENV = "MMFM_FAULTS_TRACE"
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGKILL")
_SPEC = re.compile(r"(?P<point>[^@,]+)@(?P<at>\d+):(?P<action>SIG[A-Z0-9]+|raise|exit(?:=\d+)?)")


class InjectedFault(RuntimeError):
    """What the `raise` action raises."""


@dataclass
class Fault:
    point: str          # a point name or a glob
    at: int             # the step, or the count of matching hits, at which it fires
    action: str
    hits: int = 0
    fired: bool = False

    def __str__(self) -> str:
        return f"{self.point}@{self.at}:{self.action}"


def parse(text: str) -> list[Fault]:
    """`POINT@N:ACTION[,…]` → faults; a malformed spec is a `ValueError` naming the variable."""
    faults = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _SPEC.fullmatch(part)
        if m is None or (m["action"].startswith("SIG") and m["action"] not in SIGNALS):
            raise ValueError(f"{ENV}={text!r}: bad fault {part!r}; expected POINT@N:ACTION with ACTION one of "
                             f"{', '.join(SIGNALS)}, raise, exit, exit=CODE (e.g. train.step@4:SIGTERM)")
        faults.append(Fault(m["point"], int(m["at"]), m["action"]))
    return faults


_FAULTS: list[Fault] | None = None
_TRACE: str | None = None
_COUNTS: dict[str, int] = {}


def arm(text: str | None, trace: str | None = None) -> None:
    """(Re)arm from a spec string and a trace file; None or '' disarms. Done at import from the environment."""
    global _FAULTS, _TRACE
    _TRACE = trace or None
    _COUNTS.clear()
    _FAULTS = (parse(text) if text else []) or ([] if _TRACE else None)


def point(name: str, at: int | None = None) -> None:
    """A named injection point; `at` = the step (None: count this process's hits of each matching fault)."""
    if _FAULTS is None:
        return
    if _TRACE is not None:
        _COUNTS[name] = _COUNTS.get(name, 0) + 1
        with open(_TRACE, "a") as fh:
            fh.write(f"{name}@{_COUNTS[name] if at is None else at}\n")
    for f in _FAULTS:
        if f.fired or not fnmatch.fnmatchcase(name, f.point):
            continue
        f.hits += 1
        if (f.hits if at is None else at) == f.at:
            f.fired = True
            _act(f, name)


def _act(f: Fault, name: str) -> None:
    if f.action == "raise":
        raise InjectedFault(f"{ENV}: {f} fired at {name}")
    if f.action.startswith("exit"):
        os._exit(int(f.action.partition("=")[2] or 1))
    signal.raise_signal(getattr(signal, f.action))  # to this thread: its handler has run when this returns


arm(os.environ.get(ENV), os.environ.get(TRACE_ENV))
