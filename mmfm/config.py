"""One configuration system: typed dataclasses, decoded by draccus from YAML, dicts and the command line.

Every command, recipe and task file goes through these functions, so a YAML key, a `--a.b=c` flag and a
`--set a.b=c` override all come from the same dataclass field (its type, its default, its comment as help).
Unknown or mistyped keys are a `ConfigError` naming the dotted key (and the file, when there is one).
Values are parsed as YAML (`yaml.safe_load`), never `eval`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from pathlib import Path
from typing import Sequence, TypeVar

import draccus
import yaml
from draccus.utils import DecodingError, ParsingError

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, override or flag that does not match the typed schema; the message names the key."""


def _message(e: Exception) -> str:
    """draccus's message, with unknown fields spelled as full dotted keys (`train.lrr`, not `lrr`)."""
    text = str(e).strip().replace("`", "")
    m = re.match(r"^(?:(\S+): )?The fields (.+) are not valid for (\w+)$", text)
    if m:
        where, names, cls = m.groups()
        keys = ", ".join(f"{where}.{n.strip()}" if where else n.strip() for n in names.split(","))
        return f"unknown config key(s) {keys} (not fields of {cls})"
    return text or type(e).__name__


def yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: 'line L, column C: what' (its own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
    what = what or " ".join(str(e).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


def decode(cls: type[T], raw: dict | None, where: str = "") -> T:
    """Build dataclass `cls` from a mapping (YAML-loaded); unknown keys and wrong types name the dotted key."""
    raw = {} if raw is None else raw
    prefix = f"{where}: " if where else ""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}expected a mapping for {cls.__name__}, got {type(raw).__name__} {raw!r}")
    try:
        return draccus.decode(cls, _listify(cls, raw))
    except DecodingError as e:
        raise ConfigError(prefix + _message(e)) from e
    except ParsingError as e:  # draccus wraps the dataclasses' own __post_init__ checks; report theirs
        raise ConfigError(prefix + _message(e.__cause__ or e)) from e
    except (TypeError, ValueError) as e:
        raise ConfigError(prefix + _message(e)) from e


def _listify(cls, raw: dict) -> dict:
    """A single value where only a list or tuple is accepted means a one-item list (`--inputs dir/`,
    `embeddings: slide`), never a string's characters; applied through nested dataclasses."""
    if not (dataclasses.is_dataclass(cls) and isinstance(raw, dict)):
        return raw
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        return raw
    out = dict(raw)
    for name, value in raw.items():
        tp = hints.get(name)
        options = [o for o in (typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType)
                               else (tp,)) if o is not type(None)]
        if options and value is not None and not isinstance(value, (list, tuple, dict)) \
                and all(typing.get_origin(o) in (list, tuple) for o in options):
            out[name] = [value]
        elif isinstance(value, dict):
            nested = [o for o in options if dataclasses.is_dataclass(o)]
            if nested:
                out[name] = _listify(nested[0], value)
    return out


def narrow(cfg, cls: type[T]) -> T:
    """The `cls` part of a command config that extends it (the command's own fields dropped)."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def to_dict(cfg) -> dict:
    """Plain YAML-able dict (tuples become lists), field order kept."""
    def plain(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def dump(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping, with `base:` resolved: the file named by `base` (relative to this file; it may have its own
    base) is read first and this file's keys are deep-merged over it — mappings merge key by key, anything else
    (lists included) is replaced. So a recipe states only its difference from the one it builds on."""
    return inherit(path, merge)


def inherit(path: str | Path, merge_fn, chain: tuple[Path, ...] = (), prepare=None):
    """The YAML document at `path` with its `base:` chain resolved by `merge_fn(base_doc, doc)`; a cycle or a
    missing base is a ConfigError naming the files. Top-level mappings only carry `base` (a list has no key).
    `prepare(path, doc)`, if given, rewrites each document of the chain before the merge (e.g. file-relative paths)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(e)})") from e
    raw = {} if raw is None else raw
    if prepare is not None and isinstance(raw, dict):
        raw = prepare(path, raw)
    if not isinstance(raw, (dict, list)) or (merge_fn is merge and not isinstance(raw, dict)):
        raise ConfigError(f"{path}: top level must be a mapping")
    if not isinstance(raw, dict) or "base" not in raw:
        return raw
    raw = dict(raw)
    base = raw.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base: expected the name of a YAML file, got {base!r}")
    parent = path.parent / base
    chain = (*chain, path)
    if parent.resolve() in {p.resolve() for p in chain}:
        raise ConfigError("base: inheritance cycle " + " → ".join(str(p) for p in (*chain, parent)))
    if not parent.is_file():
        raise ConfigError(f"{path}: base: no such file {parent}")
    return merge_fn(inherit(parent, merge_fn, chain, prepare), raw)


def apply_override(raw: dict, assignment: str) -> dict:
    """Apply one `a.b.c=value` override in place; the value is parsed by yaml.safe_load."""
    key, sep, text = assignment.partition("=")
    key = key.strip().removeprefix("--")
    parts = key.split(".")
    if not sep or not key or any(not p for p in parts):
        raise ConfigError(f"override {assignment!r}: expected a.b.c=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse {text!r}: {yaml_problem(e)}") from e
    node = raw
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not a mapping")
        node = nxt
    node[parts[-1]] = value
    return raw


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """YAML file (optional) + `a.b=value` overrides → a checked `cls`; errors name the file and dotted key."""
    raw = read_yaml(path) if path is not None else {}
    for o in overrides:
        apply_override(raw, o)
    return decode(cls, raw, str(path) if path is not None else "")


def cli_args(argv: Sequence[str], aliases: dict[str, str] | None = None,
             set_prefix: str = "") -> tuple[str | None, list[str]]:
    """Split a command line into (YAML path, dotted overrides).

    Accepted forms, all equivalent: `--a.b=c`, `--a.b c`, `--set a.b=c`; `--config FILE` (or draccus's
    `--config_path FILE`) names the YAML file. Flags are spelled with `_` or `-` alike; a bare `--flag` is
    true and a bare `--no-flag` false. `aliases` maps a short flag or a key's first part to its dotted key
    (`cases` → `n_cases`, `sim.seed` → `cohort.simulate.seed`);
    `set_prefix` puts `--set` overrides under a sub-config (the demo's `recipe.`).
    """
    aliases = aliases or {}
    path, out, i, argv = None, [], 0, list(argv)
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r} (flags look like --key=value)")
        name, eq, value = a[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                value, i = nxt, i + 1
            elif name in ("set", "config", "config_path"):
                raise ConfigError(f"--{name}: needs a value")
            elif name.startswith("no-") or name.startswith("no_"):
                name, value = name[3:], "false"
            else:
                value = "true"
        if name in ("config", "config_path"):
            path = value
        elif name == "set":
            out.append(set_prefix + value)
        else:
            key = name.replace("-", "_")
            head, dot, tail = key.partition(".")
            out.append(f"{aliases[head] + dot + tail if head in aliases else key}={value}")
        i += 1
    return path, out


def parse_cli(cls: type[T], argv: Sequence[str], base: str | Path | dict | None = None,
              aliases: dict[str, str] | None = None, set_prefix: str = "") -> T:
    """A command's dataclass from its flags (see `cli_args`); `base` is a default YAML under the user's file."""
    path, overrides = cli_args(argv, aliases, set_prefix)
    raw = dict(base) if isinstance(base, dict) else read_yaml(base) if base is not None else {}
    if path is not None:
        raw = merge(raw, read_yaml(path))
    for o in overrides:
        apply_override(raw, o)
    return decode(cls, raw, str(path) if path is not None else "")


def merge(base: dict, top: dict) -> dict:
    """`top` deep-merged over `base`: mappings merge key by key, any other value (lists included) replaces."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def help_text(cls: type, prog: str, description: str) -> str:
    """`--help`: the command's paragraph and example, then every field with its type, default and comment."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        draccus.parse(cls, args=["--help"], prog=prog)
    return description.strip() + "\n\n" + buf.getvalue()


def fail(prog: str, e: Exception) -> int:
    """A user error: one line on stderr naming the file / key, exit code 2 (never a traceback)."""
    print(f"{prog}: error: {_message(e)}", file=sys.stderr)
    return 2
