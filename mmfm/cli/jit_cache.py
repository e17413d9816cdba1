"""The persistent XLA compilation cache every `mmfm` command uses: a command compiles a function once per machine.

Configured through JAX's own environment variables before jax is imported (so `mmfm validate` still never imports
it, and subprocesses — `mmfm launch`, multi-process training — inherit it):

    MMFM_COMPILATION_CACHE unset     $XDG_CACHE_HOME/mmfm/jax (default ~/.cache/mmfm/jax)
    MMFM_COMPILATION_CACHE=DIR       that directory
    MMFM_COMPILATION_CACHE=off       no persistent cache (also: --compilation-cache off on any command)
    JAX_COMPILATION_CACHE_DIR=DIR    an explicit JAX setting wins over all of the above but `off`

Several processes may share one directory: JAX 0.10's file cache writes an entry in place (no rename), but with a
size bound (`JAX_COMPILATION_CACHE_MAX_SIZE`, default 4 GiB, least recently used entries evicted) every read and
write holds a file lock on the directory, so no process reads a half-written entry. A corrupt entry (a writer
killed mid-write) is a cache miss with a warning, never an error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "MMFM_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no", "none", "")
MAX_SIZE = 4 << 30  # bytes; a finite bound also turns on JAX's cross-process file lock
MIN_COMPILE_SECS = 0.0  # JAX's default (1 s) skips most functions of a CPU run, 0.1 s still ~80 of the demo's 200
#                        compiles (small eager ops: 0.05–0.1 s each, more on a loaded machine); a hit costs milliseconds


def default_dir(environ=os.environ) -> Path:
    return Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmfm" / "jax"


def configure(value: str | None = None, environ=os.environ) -> str | None:
    """Turn the cache on (or off) for this process and its children; `value` (a --compilation-cache flag) wins over
    MMFM_COMPILATION_CACHE. Returns the cache directory, or None when off."""
    value = environ.get(ENV) if value is None else value
    if value is not None and value.strip().lower() in OFF:
        environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
        path = None
    else:
        path = environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(value).expanduser() if value
                                                                   else default_dir(environ)))
        environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(MIN_COMPILE_SECS))
        environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(MAX_SIZE))
    if environ is os.environ and "jax" in sys.modules:  # imported already (a test, a notebook calling main()): env vars are read at import only
        import jax

        jax.config.update("jax_enable_compilation_cache", path is not None)
        if path is not None:
            jax.config.update("jax_compilation_cache_dir", path)
            jax.config.update("jax_persistent_cache_min_compile_time_secs",
                              float(environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
            jax.config.update("jax_compilation_cache_max_size", int(environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))
    return path


CHEAP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def start_backend(cheap_emitters: bool, environ=os.environ) -> bool:
    """Start JAX's backend now; with `cheap_emitters`, XLA:CPU compiles with its classic emitters instead of its
    fusion emitters: half the compile time of small programs (a train step 2.4 → 1.2 s), slower execution of large
    ones — for runs whose compiles outweigh their steps (`fast_compile`). XLA reads XLA_FLAGS once, as the backend
    starts, so this holds for the whole process and only if nothing started the backend before (a notebook, a test
    process: False, nothing changed). XLA_FLAGS is put back afterwards: subprocesses compile as they would have.
    A compute-bound function can still ask for the fusion emitters (`jax.jit(compiler_options=...)`, e.g. the
    report trunk's `mmfm.models.text_cache.sentence_features`)."""
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return False
    before = environ.get("XLA_FLAGS")
    if cheap_emitters:
        environ["XLA_FLAGS"] = f"{before or ''} {CHEAP_EMITTERS}".strip()
    try:
        jax.devices()
    finally:
        if before is None:
            environ.pop("XLA_FLAGS", None)
        else:
            environ["XLA_FLAGS"] = before
    return True


def machine_dir(name: str, environ=os.environ) -> Path | None:
    """`<compilation cache>/<name>`: where a command keeps other results computed once per machine (the frozen
    report trunk's features, `mmfm.cli.pipeline.report_features`; simulated cohorts, `mmfm.simulate.cache`); None
    when the cache is off or not a local folder. JAX's size bound and eviction only count its own `*-cache` files
    at the top level."""
    where = environ.get("JAX_COMPILATION_CACHE_DIR", "")
    if environ.get("JAX_ENABLE_COMPILATION_CACHE", "true").lower() in ("false", "0") or not where or "://" in where:
        return None
    return Path(where) / name


def pop_flag(argv: list[str]) -> tuple[list[str], str | None]:
    """argv without `--compilation-cache VALUE` / `--compilation-cache=VALUE` / `--no-compilation-cache`, and VALUE."""
    rest, value, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--no-compilation-cache":
            value = "off"
        elif a.startswith("--compilation-cache="):
            value = a.split("=", 1)[1]
        elif a == "--compilation-cache" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 1
        else:
            rest.append(a)
        i += 1
    return rest, value
