"""Run one command as N cooperating JAX processes on this machine (loopback coordinator, gloo on CPU).

    python tests/multiprocess/launch.py -n 2 -- python -m mmfm.cli pretrain --config ... --out RUN

Each process gets `--coordinator 127.0.0.1:PORT --num-processes N --process-id i` appended and one CPU
device (XLA_FLAGS); the launcher waits for all, kills the rest if one fails, and exits with the first
non-zero code. Used by tests/test_train_multiprocess.py.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], n: int, timeout: float = 600.0, env: dict | None = None,
           xla_flags: str = "--xla_force_host_platform_device_count=1") -> tuple[int, list[str]]:
    """→ (exit code, output of each process); `xla_flags`: each process's XLA_FLAGS, giving it one CPU device."""
    port = free_port()
    base = dict(os.environ if env is None else env, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(cmd + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                                     "--process-id", str(i)], env=base, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(n)]
    deadline, code = time.time() + timeout, 0
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.poll() not in (None, 0)]
        if failed or time.time() > deadline:
            code = failed[0].returncode if failed else 124
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.1)
    outs = [p.communicate()[0] for p in procs]
    code = code or next((p.returncode for p in procs if p.returncode), 0)
    return code, outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    code, outs = launch(cmd, a.n, a.timeout)
    for i, out in enumerate(outs):
        print(f"--- process {i} (exit {code}) ---\n{out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
