"""dvc.yaml cannot drift from the code: each stage's `deps` hold every repo module its command imports (and
no code it never imports), and its `params` every key of the config it loads. The stages are those DVC itself
resolves from the template, once per pair of params.yaml's `pairs:`.

A stage's imports are walked with `ast`, never by importing: from the handler its `speckv ...` command
dispatches to (only the code that handler reaches in its CLI module, since several stages share one), then
through every repo module it imports, lazy imports inside functions included. `if TYPE_CHECKING:` blocks
are skipped: they never run.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from repo_modules import (
    FOLDERS,
    PLUGINS_MODULE,
    ROOT,
    imports,
    is_type_checking,
    module_file,
    package_of,
    plugin_modules,
    rel,
    walk,
)
from speckv.pipeline.cli import build_parser
from speckv.pipeline.config import PAIR_SECTIONS, load_params, load_section, pair_config


def resolved_stages(root: Path) -> dict[str, dict]:
    """{stage name: its definition} as DVC resolves dvc.yaml's templates (`calibrate@qwen-coder`, ...)."""
    from dvc.parsing import DataResolver
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        resolver = DataResolver(repo, repo.root_dir, yaml.safe_load((root / "dvc.yaml").read_text()))
        return resolver.resolve()["stages"]


STAGES = resolved_stages(ROOT)
PAIRS = list(load_params(ROOT / "params.yaml")["pairs"])

# Modules a stage imports but leaves out of its deps on purpose (their own imports are not walked either).
LEFT_OUT = {
    # Only times the model card's 1-token forwards; a change to the decode loop must not retrain the draft.
    "distill": {"profiling/calibrate.py"},
}
# Files other than Python that a module reads at run time.
RESOURCES = {"predictor/evaluation/report_render.py": ("predictor/evaluation/templates/report.html.j2",)}
_rel = rel
_imports = imports
_walk = walk


def _files(names: set[str]) -> set[str]:
    """Repo files of these module names plus the package __init__ files importing them executes."""
    out = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:i]))
            if path is None:
                continue
            # An __init__ that is only a docstring (or empty) changes nothing when it runs.
            body = ast.parse(path.read_text()).body
            if path.name != "__init__.py" or any(not isinstance(n, ast.Expr) for n in body):
                out.add(_rel(path))
    return out


def handler_imports(module_name: str, func_name: str) -> set[str]:
    """Modules the handler reaches in its CLI module: top-level imports it uses, and its lazy imports."""
    path = module_file(module_name)
    tree = ast.parse(path.read_text())
    package = module_name.rpartition(".")[0]
    defined: dict[str, ast.AST] = {}
    imported: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            defined[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defined[name.id] = node
        elif isinstance(node, ast.Import | ast.ImportFrom) and not is_type_checking(node):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                imported.setdefault(bound, set()).update(_imports(node, package))
    modules: set[str] = set()
    seen: set[str] = set()
    queue = [func_name]
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in _walk(defined[name]):
            if isinstance(node, ast.Name):
                if node.id in defined:
                    queue.append(node.id)
                modules |= imported.get(node.id, set())
            elif isinstance(node, ast.Import | ast.ImportFrom):
                modules |= set(_imports(node, package))
    return modules


def stage_handler(cmd: str) -> tuple[str, str]:
    """(module, function) that `speckv ...` dispatches to, found with the real argument parser."""
    argv = shlex.split(cmd)
    assert argv[0] == "speckv", f"stage command {cmd!r} is not a speckv subcommand"
    func = build_parser().parse_args(argv[1:]).func
    return func.__module__, func.__name__


def stage_imports(stage: str) -> set[str]:
    """Repo files (and resources) the stage's command executes, except those LEFT_OUT of it on purpose."""
    module, func = stage_handler(STAGES[stage]["cmd"])
    left_out = LEFT_OUT.get(stage, set())
    files = {_rel(module_file(module))}
    queue = sorted(handler_imports(module, func))
    seen = set()
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        new = _files({name}) - left_out
        files |= new
        for path in new:
            tree_source = (ROOT / path).read_text()
            tree = ast.parse(tree_source)
            found = [
                m for node in walk(tree) for m in imports(node, package_of(ROOT / path)) if module_file(m)
            ]
            # the engine reaches entry-point modules by name (`mlp:` controllers, the `default` models)
            queue += found + sorted(plugin_modules(tree_source) if PLUGINS_MODULE in found else ())
    for path in list(files):
        files.update(RESOURCES.get(path, ()))
    return files


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d.rstrip("/") or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_hold_every_module_the_stage_imports(stage):
    deps = STAGES[stage].get("deps", [])
    missing = sorted(f for f in stage_imports(stage) if not covered(f, deps))
    assert not missing, (
        f"dvc.yaml stage {stage!r} (`{STAGES[stage]['cmd']}`) runs code missing from its deps, so editing it "
        f"would not rerun the stage: add {missing} to stages.{stage}.deps "
        f"(or, if deliberate, to LEFT_OUT in {Path(__file__).name} with the reason)"
    )


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_hold_no_code_the_stage_never_imports(stage):
    imports = stage_imports(stage) | LEFT_OUT.get(stage, set())
    code = [d for d in STAGES[stage].get("deps", []) if d.split("/")[0] in FOLDERS]
    listed = {
        _rel(p)
        for d in code
        for p in ([ROOT / d] if (ROOT / d).is_file() else (ROOT / d).rglob("*.py"))
        if p.suffix == ".py"
    }
    extra = sorted(listed - imports)
    assert not extra, (
        f"dvc.yaml stage {stage!r} lists code it never imports, so editing it reruns the stage for nothing: "
        f"remove {extra} from stages.{stage}.deps (list files, not whole package directories)"
    )


def config_sections(stage: str) -> dict[str, type]:
    """{params section: config dataclass} for every `load_section(Config, "section", ...)` the handler reaches."""
    module_name, func = stage_handler(STAGES[stage]["cmd"])
    module = importlib.import_module(module_name)
    tree = ast.parse(module_file(module_name).read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    sections: dict[str, type] = {}
    seen, queue = set(), [func]
    while queue:
        name = queue.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        lazy = {}
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.ImportFrom):
                lazy.update({a.asname or a.name: node.module for a in node.names})
            elif isinstance(node, ast.Name):
                queue.append(node.id)
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_section":
                cls_name, section = node.args[0].id, node.args[1].value
                owner = importlib.import_module(lazy[cls_name]) if cls_name in lazy else module
                sections[section] = getattr(owner, cls_name)
    return sections


def stage_pair(stage: str) -> str | None:
    """The pair a stage runs for: its command's `--pair`, or None (the default pair's own stages)."""
    argv = shlex.split(STAGES[stage]["cmd"])
    return argv[argv.index("--pair") + 1] if "--pair" in argv else None


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_params_hold_every_key_the_stage_reads(stage):
    params = STAGES[stage].get("params", [])
    assert all(isinstance(p, str) for p in params), f"stage {stage!r}: list params.yaml keys as strings"
    sections = config_sections(stage)
    expected = {f"{section}.{f.name}" for section, cls in sections.items() for f in dataclasses.fields(cls)}
    pair = stage_pair(stage)
    if pair is not None:  # the pair's entry: its outputs directory and its keys of each section read
        expected |= {f"pairs.{pair}.artifacts"} | {f"pairs.{pair}.{section}" for section in sections}
    missing = sorted(k for k in expected if k not in params and k.split(".")[0] not in params)
    unknown = sorted(p for p in params if "." in p and p not in expected)
    assert not missing, f"dvc.yaml stage {stage!r} reads params it does not list: add {missing}"
    assert not unknown, f"dvc.yaml stage {stage!r} lists params no config field reads: remove {unknown}"


def test_the_walk_sees_lazy_imports_and_skips_other_handlers():
    # pipeline/profile.py serves two stages: calibrate imports profiling.calibrate lazily, profile does not.
    assert "profiling/calibrate.py" in stage_imports("calibrate@default")
    assert "profiling/calibrate.py" not in stage_imports("profile@default")
    assert "profiling/profile.py" in stage_imports("profile@default")
    # models fetch shares pipeline/models.py with distill but never reaches data/distill.py
    assert "data/distill.py" not in stage_imports("fetch")
    # transitive: the report's cost-model plot loads profiling/costmodel.py through its report module
    assert {"predictor/evaluation/report.py", "profiling/costmodel.py"} <= stage_imports("report@default")


def _outputs(stage: dict) -> set[str]:
    return {
        e if isinstance(e, str) else next(iter(e))
        for k in ("outs", "metrics", "plots")
        for e in stage.get(k, [])
    }


def _within(path: str, other: str) -> bool:
    return path == other or path.startswith(other.rstrip("/") + "/")


def test_every_pair_runs_every_templated_stage_and_no_other_dvc_yaml_exists():
    templated = {name.partition("@")[0] for name in STAGES if "@" in name}
    assert templated == {"prompts", "calibrate", "profile", "train", "evaluate", "batch", "report"}
    assert {name for name in STAGES if "@" in name} == {f"{s}@{p}" for s in templated for p in PAIRS}
    assert {"default", "qwen-coder"} <= set(PAIRS)
    assert all(stage_pair(f"{s}@{p}") == p for s in templated for p in PAIRS)
    others = [p for folder in (*FOLDERS, "benchmarks", "tests") for p in (ROOT / folder).rglob("dvc.yaml")]
    assert not others, f"one pipeline definition: move {others} into dvc.yaml's templates"


def test_no_two_stages_write_the_same_place():
    owner: dict[str, str] = {}
    for name, stage in STAGES.items():
        for out in _outputs(stage):
            clash = next((o for o in owner if _within(out, o) or _within(o, out)), None)
            assert clash is None, f"{name} writes {out}, inside or around {clash} of {owner.get(clash)}"
            owner[out] = name


@pytest.mark.parametrize("stage", sorted(s for s in STAGES if stage_pair(s)))
def test_a_pair_stage_reads_and_writes_where_its_config_says(stage):
    """The pair's config, as its command loads it (valid: unknown keys and wrong types raise), names only paths
    of its own outputs directory that the stage lists among its deps or outputs, so DVC tracks what it runs."""
    pair = stage_pair(stage)
    artifacts = pair_config(load_params(ROOT / "params.yaml"), pair).artifacts
    listed = set(STAGES[stage]["deps"]) | _outputs(STAGES[stage])
    for section, cls in config_sections(stage).items():
        config = load_section(cls, section, ROOT / "params.yaml", pair)
        for field in dataclasses.fields(cls):
            value = getattr(config, field.name)
            if not isinstance(value, str) or not value.startswith("artifacts"):
                continue
            assert _within(value, artifacts), (
                f"{stage}: {section}.{field.name} = {value} is not under {artifacts}"
            )
            assert any(_within(value, p) or _within(p, value) for p in listed), (
                f"{stage}: {section}.{field.name} = {value} is neither a dep nor an output of the stage"
            )


def test_every_pair_entry_holds_each_section_dvc_tracks():
    params = load_params(ROOT / "params.yaml")
    for pair in PAIRS:
        entry = pair_config(params, pair)  # raises on a missing or unknown key
        assert {f.name for f in dataclasses.fields(entry)} >= set(PAIR_SECTIONS)


def _stand_in(path: Path) -> None:
    """A placeholder for a pipeline artifact: a file when the name has a suffix, else a directory."""
    if path.exists():
        return
    if path.suffix:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"stand-in for {path.name}\n")
    else:
        path.mkdir(parents=True)
        (path / "part-0").write_text("stand-in\n")


@pytest.mark.slow  # runs DVC itself on a copy of the code
def test_dvc_status_flags_exactly_the_stages_that_import_an_edited_module(tmp_path):
    """Real DVC on a copy of the code, dvc.yaml and params.yaml with stand-in artifacts: once committed every
    stage of every pair is up to date, and one edited line of predictor/policy.py changes exactly the stages
    importing it, for each pair."""
    repo = tmp_path / "repo"
    for package in FOLDERS:
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    for stage in STAGES.values():
        for key in ("deps", "outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                _stand_in(repo / (entry if isinstance(entry, str) else next(iter(entry))))
    dvc = [sys.executable, "-m", "dvc"]

    def status() -> dict:
        done = subprocess.run(
            [*dvc, "status", "--json"], cwd=repo, capture_output=True, text=True, check=True
        )
        return json.loads(done.stdout)

    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=repo, check=True)
    subprocess.run([*dvc, "commit", "-f", "-q"], cwd=repo, check=True, capture_output=True)
    assert status() == {}
    edited = "predictor/policy.py"
    with (repo / edited).open("a") as f:
        f.write("# one more line\n")
    expected = {s for s in STAGES if edited in stage_imports(s)}
    assert {"evaluate@default", "evaluate@qwen-coder"} <= expected
    assert set(status()) == expected
