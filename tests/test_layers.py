"""Import arrows point down: every module of the package belongs to a layer, and a module
imports only from its own layer or a lower one.

The layers, lowest first, are LAYERS below. Each module's imports are read with `ast` (no
module is imported), so a deferred import inside a function counts like any other: an
upward arrow hidden in a function body is still an upward arrow. A failure prints every
offending arrow as `importer (layer) -> imported (layer)`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import feed_dagster

PACKAGE = Path(feed_dagster.__file__).parent
ROOT = "feed_dagster"

# Lowest first. A module belongs to the layer of its longest matching prefix; a module may
# import its own layer and any layer listed before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # Building blocks with no project imports: errors, atomic file writes, artifacts on a
    # directory or a bucket, storage paths, step memory, plot/table rendering, the CLI's
    # progress display, batched sorted search, workers that end with their parent, pickles
    # whose arrays are mapped.
    (
        "base",
        (
            "errors",
            "atomic",
            "artifacts",
            "paths",
            "memory",
            "plots",
            "progress",
            "sorted_search",
            "processes",
            "mapped_pickle",
        ),
    ),
    # Canonical tables, validation, the warehouse connection and its two backends (a DuckDB
    # file or Parquet objects on a bucket), world_info and Parquet folders.
    ("data", ("data",)),
    ("world", ("world",)),
    # The EBNeRD synthetic writer borrows the world's topic vocabulary.
    ("ebnerd", ("ebnerd",)),
    # Choosing a source by its spec: the one module that knows world, EBNeRD and Parquet.
    ("sources", ("sources",)),
    ("embeddings", ("embeddings",)),
    ("graph", ("graph",)),
    ("vectors", ("vectors",)),
    ("metrics", ("metrics",)),
    ("models", ("models",)),
    # The candidate pipeline knows models only through its Retriever/Scorer protocols.
    ("pipeline", ("pipeline",)),
    ("feeds", ("feeds",)),
    ("serving", ("serving",)),
    # Publishing a generation of shard files: the one module that knows both the feeds'
    # shard files and the serving side's guard and publish, which know nothing of each other.
    ("generation", ("generation",)),
    # The ingest writes the warehouse and the serving side's safety list.
    ("incoming", ("incoming",)),
    ("resources", ("resources",)),
    ("assets", ("assets",)),
    ("jobs", ("jobs",)),
    ("definitions", ("definitions",)),
    ("cli", ("cli",)),
]
# The core: pure Python/polars/torch, testable without Dagster.
CORE = (
    "data",
    "world",
    "ebnerd",
    "sources",
    "embeddings",
    "graph",
    "vectors",
    "metrics",
    "models",
    "pipeline",
    "feeds",
    "serving",
    "generation",
    "incoming",
    "base",
)
# Shared by the asset modules and defining no asset: the retry policy and fail-fast rule
# every step uses, the publish's automation condition, and reading an upstream asset's
# materialization metadata.
ASSET_HELPERS = {
    "feed_dagster.assets.retry",
    "feed_dagster.assets.conditions",
    "feed_dagster.assets.upstream",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports (absolute names), wherever the import statement sits."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            # `from feed_dagster.assets import feeds` imports the module assets.feeds.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def layer_of(name: str) -> int | None:
    """Index in LAYERS of a feed_dagster module (None for the package root itself)."""
    rest = name.removeprefix(ROOT + ".") if name != ROOT else ""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (rest == prefix or rest.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def project_imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (names of attributes imported from a module are
    dropped: only real modules count)."""
    return {m for m in imports(name, path) if m in known and m != name}


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in modules() if m != ROOT and layer_of(m) is None)
    assert not unplaced, f"modules without a layer (add them to LAYERS): {unplaced}"


def test_imports_point_down() -> None:
    known = modules()
    arrows = []
    for name, path in known.items():
        own = layer_of(name)
        for target in sorted(project_imports(name, path, known)):
            other = layer_of(target)
            if own is not None and other is not None and other > own:
                arrows.append(f"{name} ({LAYERS[own][0]}) -> {target} ({LAYERS[other][0]})")
    assert not arrows, "upward imports:\n  " + "\n  ".join(arrows)


def test_asset_modules_do_not_import_each_other() -> None:
    known = modules()
    assets = {m for m in known if m.startswith(ROOT + ".assets.")} - ASSET_HELPERS
    arrows = [
        f"{name} -> {target}"
        for name in sorted(assets)
        for target in sorted(project_imports(name, known[name], known))
        if target in assets
    ]
    assert not arrows, "asset modules importing asset modules:\n  " + "\n  ".join(arrows)


def test_asset_helpers_define_no_assets() -> None:
    known = modules()
    for name in ASSET_HELPERS:
        tree = ast.parse(known[name].read_text())
        decorators = [
            ast.unparse(d)
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef)
            for d in node.decorator_list
        ]
        assert not [d for d in decorators if "asset" in d], f"{name} defines assets"


def test_core_and_cli_never_import_dagster() -> None:
    """The CLI runs Dagster only through feed_dagster/jobs (step_runs, instance), so the
    Dagster side of `run` has one home and the CLI stays a thin caller."""
    core = {index for index, (layer, _) in enumerate(LAYERS) if layer in (*CORE, "cli")}
    offenders = [
        f"{name} -> {module}"
        for name, path in modules().items()
        if layer_of(name) in core
        for module in sorted(imports(name, path))
        if module == "dagster" or module.startswith(("dagster.", "dagster_"))
    ]
    assert not offenders, "core or CLI modules importing dagster:\n  " + "\n  ".join(offenders)


def test_the_checker_sees_an_upward_arrow(tmp_path: Path) -> None:
    """The parser resolves relative and deferred imports, so the checks above cannot pass
    by missing an arrow."""
    path = tmp_path / "mod.py"
    path.write_text(
        "def f():\n    from ..serving import read\n    import feed_dagster.assets.feeds\n"
    )
    found = imports("feed_dagster.data.mod", path)
    assert {"feed_dagster.serving.read", "feed_dagster.assets.feeds"} <= found
    assert layer_of("feed_dagster.serving.read") > layer_of("feed_dagster.data.mod")
