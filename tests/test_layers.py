"""The package's layers run one way: data → (simulate, importers) → models → objectives → train → eval → cli,
bridges beside.

Read from the source (every `import`, including imports inside functions), so a lazy import cannot hide an
arrow that runs back up a layer. `mmfm/__init__.py`, `io.py`, `config.py`, `metrics.py` and `faults.py` are the
base every layer may use; only `cli` and the bridges themselves may import `bridges` (torch lives there). The producers of
cohorts (`simulate`, `importers`) write what `data` reads: models, objectives and training never import them
(training reads a cohort, never how it was made); eval may grade against the simulator's truth. `testing`
(fixtures for tests and notebooks) sits on top: nothing in the package imports it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mmfm"
RANK = {"base": 0, "data": 1, "simulate": 2, "importers": 2, "models": 3, "objectives": 4, "train": 5, "eval": 6,
        "bridges": 6, "cli": 7, "testing": 8}
PRODUCERS = ("simulate", "importers")


def layer(module: str) -> str:
    if module == "mmfm.__main__":  # `python -m mmfm`: an entry point, the command layer
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "base"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("mmfm"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names
                       if (PKG.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                       or (PKG.parent / f"{node.module}.{a.name}".replace(".", "/")).is_dir())
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("mmfm"))
    return out


GRAPH = {module_name(p): imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_import_runs_down_the_layers():
    bad = []
    for mod, deps in GRAPH.items():
        for dep in deps:
            src, dst = layer(mod), layer(dep)
            if dst == "bridges" and src not in ("bridges", "cli"):
                bad.append(f"{mod} → {dep} (only cli and bridges import the torch bridges)")
            elif src != "bridges" and RANK[dst] > RANK[src]:
                bad.append(f"{mod} → {dep} ({src} must not import {dst})")
            elif dst in PRODUCERS and src in ("models", "objectives", "train"):
                bad.append(f"{mod} → {dep} ({src} reads cohorts, never the code that produced them)")
            elif src in PRODUCERS and dst in PRODUCERS and src != dst:
                bad.append(f"{mod} → {dep} (the producers of cohorts stand side by side)")
    assert not bad, "imports running back up a layer:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    def targets(deps):
        return {d for d in deps if d in GRAPH and d != "mmfm"}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(targets(GRAPH[m])):
            if d == m or d.startswith(m + "."):  # a package's __init__ importing its submodules (`from pkg import
                continue                              # sub` names pkg itself) is not a cycle
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " → ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_data_layer_imports_no_model_or_trainer():
    """The grain loader brings jax (grain uses it); the contract, simulator, importers and splits stay numpy-only."""
    code = ("import sys, mmfm.data.cohort, mmfm.simulate, mmfm.importers, mmfm.data.splits, mmfm.data.omics;"
            "light = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'torch', 'optax'));"
            "import mmfm.data.loader, mmfm.data.text;"
            "bad = light + sorted(m for m in sys.modules if "
            "m.startswith(('mmfm.models', 'mmfm.train', 'mmfm.eval', 'mmfm.objectives', 'mmfm.bridges')));"
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_pipeline_imports_no_scanpy():
    """scanpy costs 1.2-1.5 s of start-up in every process; mmfm.data.omics reproduces the three calls it needed.
    Only the Visium importer may load it, inside its function."""
    code = ("import sys, mmfm.cli.pipeline, mmfm.cli.demo, mmfm.data.omics, mmfm.eval.probes.regression, "
            "mmfm.eval.tasks.spots, mmfm.eval.tasks.regression, mmfm.importers;"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'scanpy'); print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_validate_command_stays_light():
    code = ("import sys; from mmfm.cli import load_command; load_command('validate');"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'torch'));"
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# A base name that two modules share means the same idea in two roles, and the folder says the role:
ROLE_PAIRS = {
    "config.py": "the config system (mmfm/config.py) and the two typed schemas it decodes (ModelConfig, RunConfig)",
    "embed.py": "a command (cli/) and what it runs (eval/)", "export.py": "command and train/ export",
    "extract.py": "command and bridges/ extraction", "heatmap.py": "command and eval/ heatmaps",
    "probe.py": "command and the eval/ probe pipeline",
    "classification.py": "estimator (eval/probes/) and task type (eval/tasks/)", "survival.py": "probes/ and tasks/",
    "retrieval.py": "probes/ and tasks/", "robustness.py": "probes/ and tasks/",
    "regression.py": "probes/ and tasks/",
    "spots.py": "the spot-table contract (data/) and the spot probe (eval/tasks/)",
    "multimodal.py": "the model (models/) and its loss (objectives/)",
    "mil.py": "the model (models/), its supervised training (eval/probes/) and the task type (eval/tasks/)",
    "omics.py": "preprocessing (data/) and encoders (models/)", "text.py": "tokenizer (data/) and encoder (models/)",
}


def test_no_two_modules_share_a_name_unless_the_folder_names_the_role():
    names: dict[str, list[str]] = {}
    for p in PKG.rglob("*.py"):
        names.setdefault(p.name, []).append(str(p.relative_to(PKG)))
    twins = {n: sorted(ps) for n, ps in names.items() if len(ps) > 1 and n not in ("__init__.py", "__main__.py")}
    assert not set(twins) - set(ROLE_PAIRS), {n: twins[n] for n in set(twins) - set(ROLE_PAIRS)}
