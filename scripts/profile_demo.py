"""Where `mmfm demo`'s time goes: per stage, XLA compilation (trace + lower + compile or cache load, per jitted
function) apart from everything else, and what a second demo on the same machine gains from the persistent cache.

    python scripts/profile_demo.py --json out/profile_demo.json [--cases 60] [--runs 2] [--cache DIR|off] \
        [-- --set train.steps=100 ...]

Each run is a fresh process and a fresh --out folder (so only the machine's caches carry over — compiled programs,
the report trunk's features and the simulated cohort, all in the compilation cache directory — not the demo's own
reuse of finished steps); by default the runs share a new, empty cache directory, so run 1 is cold and run 2 warm. Stages are the demo's own `[demo] <stage> done in` lines; compile figures are JAX's monitoring events
(/jax/core/compile/*_duration, /jax/compilation_cache/*), attributed to the stage they happened in. CPU seconds
sit beside wall seconds because a shared machine inflates wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

STAGE = re.compile(r"^\[demo\] (?P<name>.+?) done in [\d.]+s")
EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
          "/jax/core/compile/backend_compile_duration": "compile_s"}  # compile_s includes a persistent-cache load


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Tee:
    """stdout that also marks a stage boundary at each `[demo] ... done in` line."""

    def __init__(self, stream, on_line):
        self.stream, self.on_line, self.buf = stream, on_line, ""

    def write(self, s):
        self.buf += s
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            self.on_line(line)
        return self.stream.write(s)

    def flush(self):
        self.stream.flush()


def child(out: str, demo_args: list[str]) -> dict:
    """One demo in this process, profiled."""
    import jax

    from mmfm.cli import main

    t0, c0 = time.perf_counter(), _cpu()
    stages, events, hits = [], [], defaultdict(int)
    mark = {"t": t0, "c": c0}

    def on_line(line):
        m = STAGE.match(line)
        if m:
            now, c = time.perf_counter(), _cpu()
            stages.append({"stage": m["name"], "end": now, "wall_s": now - mark["t"], "cpu_s": c - mark["c"]})
            mark.update(t=now, c=c)

    def on_duration(event, secs, **kw):
        if event in EVENTS:  # tracing names the Python function, lowering and compiling 'jit(<name>)'
            name = re.sub(r"^jit\((.*)\)$", r"\1", str(kw.get("fun_name", "?")))
            events.append((time.perf_counter(), EVENTS[event], name, secs))

    def on_event(event, **kw):
        hits[event.rsplit("/", 1)[-1]] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    sys.stdout = _Tee(sys.stdout, on_line)
    try:
        rc = main(["demo", "--out", out, *demo_args])
    finally:
        sys.stdout = sys.stdout.stream
    total = time.perf_counter() - t0
    rows = []
    for i, st in enumerate(stages + [{"stage": "(after the last stage)", "end": float("inf"), "wall_s": None}]):
        start = stages[i - 1]["end"] if i else t0
        mine = [e for e in events if start <= e[0] < st["end"]]
        fns: dict[str, dict] = defaultdict(lambda: {"count": 0, "trace_s": 0.0, "lower_s": 0.0, "compile_s": 0.0})
        for _, kind, fn, secs in mine:
            fns[fn][kind] += secs
            fns[fn]["count"] += kind == "compile_s"
        if st["wall_s"] is None and not mine:
            continue
        compile_total = sum(v for f in fns.values() for k, v in f.items() if k != "count")
        rows.append({"stage": st["stage"], "wall_s": _r(st["wall_s"]), "cpu_s": _r(st.get("cpu_s")),
                     "compile_s": _r(compile_total), "compiles": sum(f["count"] for f in fns.values()),
                     "functions": {k: {kk: _r(vv) for kk, vv in v.items()}
                                   for k, v in sorted(fns.items(), key=lambda kv: -kv[1]["compile_s"])}})
    return {"rc": rc, "wall_s": _r(total), "cpu_s": _r(_cpu() - c0), "compile_s": _r(sum(r["compile_s"] for r in rows)),
            "compiles": sum(r["compiles"] for r in rows), "cache_events": dict(hits), "stages": rows}


def _r(v):
    return None if v is None else round(float(v), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="write the figures here")
    ap.add_argument("--cases", type=int, default=None, help="simulated cases (default: the pipeline file's)")
    ap.add_argument("--runs", type=int, default=2, help="demos in a row on one cache (1 = cold only)")
    ap.add_argument("--cache", default=None, help="compilation cache dir shared by the runs, or 'off' "
                                                  "(default: a new empty directory, so run 1 is cold)")
    ap.add_argument("--workdir", default=None, help="where the demos write (default: a temporary folder)")
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args, demo_args = ap.parse_known_args()
    demo_args = [a for a in demo_args if a != "--"]
    if args.child_out:  # one profiled demo in this process
        cases = [] if args.cases is None else ["--cases", str(args.cases)]
        Path(args.json).write_text(json.dumps(child(args.child_out, [*cases, *demo_args])))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="profile-demo-"))
    cache = args.cache or str(work / "jax-cache")
    env = dict(os.environ, MMFM_COMPILATION_CACHE=cache)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    runs = []
    for i in range(args.runs):
        part = work / f"run{i}.json"
        cmd = [sys.executable, __file__, "--json", str(part), *([] if args.cases is None else ["--cases", str(args.cases)]),
               "--child-out", str(work / f"demo{i}"), *demo_args]
        subprocess.run(cmd, env=env, check=True)
        runs.append(json.loads(part.read_text()))
        r = runs[-1]
        if r["rc"] != 0:
            raise SystemExit(f"[profile] run {i + 1}: mmfm demo exited {r['rc']} (see above)")
        print(f"[profile] run {i + 1}: {r['wall_s']:.1f}s wall, {r['compile_s']:.1f}s compiling "
              f"({r['compiles']} compiles), cache {r['cache_events']}", flush=True)
    result = {"cases": args.cases, "demo_args": demo_args, "cache": cache, "cpu": _cpu_model(),
              "load_avg": os.getloadavg(), "nproc": os.cpu_count(), "runs": runs}
    if len(runs) > 1:
        result["second_over_first_wall"] = _r(runs[1]["wall_s"] / runs[0]["wall_s"])
        result["second_over_first_cpu"] = _r(runs[1]["cpu_s"] / runs[0]["cpu_s"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
