"""The package's layers hold: every import of every module (those inside functions and TYPE_CHECKING blocks too) is
read with `ast` and checked against the rules below; a failure lists each forbidden edge as importer -> imported.

Layers, bottom up:
  reddit/                the data source: self-contained, its settings arrive as values (reddit/settings.py)
  hub, runs              base helpers (the Hub probe; run folders, pointers, atomic JSON)
  config                 the one module that reads the environment (`_quiet` only sets defaults for libraries)
  stages                 preprocessing/, training/, aggregation/, evaluation/ and any other subpackage but crew/;
                         history (the typed run history, made of the stages' reports) sits with them
  the crew layer         crew/, workspace, data_source (config -> reddit/ settings), main (the CLI)

Rules (each is one entry of RULES or one check below):
  - reddit/ imports nothing of fl_crew_reddit outside reddit/ (but _quiet and redact, the URL-secret masking leaf,
    which itself imports nothing of fl_crew_reddit);
  - preprocessing/ imports only preprocessing/, reddit/ and hub (and _quiet): no config, training/, runs or crew
    layer; its settings arrive as arguments or as duck-typed objects (`QualityRules.from_settings(cfg)`);
  - aggregation/ imports nothing of fl_crew_reddit outside aggregation/; evaluation/metrics.py nothing of it at all;
    neither does I/O: no os, pathlib, io, shutil, socket, requests, safetensors, ... imports, no open(), no
    torch.save / torch.load, no read_text / write_bytes and the like; metrics.py imports only math-like stdlib
    modules, sacrebleu and rouge_score;
  - nothing below the crew layer imports crew/, workspace, data_source or main (stages may import runs: it is a
    file helper that imports no stage);
  - hub and runs import no stage and nothing of the crew layer; config imports only reddit/, hub and redact;
  - nothing imports main; nothing outside crew/ imports crew/ but main and the package's lazy export (__init__);
  - only config.py reads the environment (os.environ, os.getenv, os.putenv, os.unsetenv); _quiet.py is the one
    exception (it sets defaults that keep third-party libraries quiet);
  - the names of our MCP tools are spelled only in reddit/tool_names.py (`RedditTool`), never as string literals.
"""
from __future__ import annotations

import ast
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import fl_crew_reddit
from fl_crew_reddit.reddit.tool_names import RedditTool

PACKAGE = "fl_crew_reddit"
PACKAGE_ROOT = Path(fl_crew_reddit.__file__).resolve().parent

CREW_LAYER = {"crew", "workspace", "data_source", "main"}
BASE_HELPERS = {"hub", "runs"}
IO_MODULES = {"os", "pathlib", "io", "shutil", "socket", "requests", "httpx", "urllib", "http", "safetensors",
              "subprocess", "tempfile", "pickle", "glob", "sqlite3", "ftplib", "smtplib", "mmap"}
IO_CALLS = {"open", "torch.save", "torch.load", "read_text", "write_text", "read_bytes", "write_bytes"}
METRICS_IMPORTS = {"__future__", "math", "statistics", "collections", "itertools", "functools", "typing",
                   "dataclasses", "re", "string", "sacrebleu", "rouge_score"}
ENVIRONMENT_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}
ENVIRONMENT_READERS = {"fl_crew_reddit.config", "fl_crew_reddit._quiet"}
TOOL_NAMES_MODULE = "fl_crew_reddit.reddit.tool_names"


@dataclass(frozen=True)
class Module:
    name: str       # fl_crew_reddit.reddit.client
    path: str       # fl_crew_reddit/reddit/client.py, for messages
    tree: ast.Module
    is_package: bool


@dataclass(frozen=True)
class Edge:
    importer: Module
    imported: str   # a module of the package
    line: int

    def __str__(self) -> str:
        return f"{self.importer.name} -> {self.imported} ({self.importer.path}:{self.line})"


def part(module: str) -> str:
    """The layer unit of a package module: its subpackage (reddit, crew, ...) or top-level module (config, ...);
    `__init__` for the package itself."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def package_modules(root: Path = PACKAGE_ROOT) -> list[Module]:
    modules = []
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        relative = path.relative_to(root.parent)
        dotted = list(relative.with_suffix("").parts)
        is_package = dotted[-1] == "__init__"
        if is_package:
            dotted = dotted[:-1]
        modules.append(Module(".".join(dotted), str(relative), ast.parse(path.read_text(encoding="utf-8")),
                              is_package))
    return modules


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names, relative levels resolved."""
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    base = base[:len(base) - node.level + (1 if module.is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: Module, known: set[str]) -> list[tuple[str, int]]:
    """Every module `module` imports (absolute names), with its line; `from pkg import sub` counts sub when
    it is a module of `known`."""
    found = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            found.append((source, node.lineno))
            found += [(f"{source}.{alias.name}", node.lineno) for alias in node.names
                      if f"{source}.{alias.name}" in known]
    return found


def package_edges(modules: Iterable[Module]) -> list[Edge]:
    modules = list(modules)
    known = {module.name for module in modules}
    edges = []
    for module in modules:
        for imported, line in imports_of(module, known):
            if imported == PACKAGE or imported.startswith(PACKAGE + "."):
                edges.append(Edge(module, imported, line))
    return edges


Rule = tuple[str, Callable[[str, str], bool]]  # (what the rule says, forbidden(importer, imported))


def _is_stage_or_below(name: str) -> bool:
    return part(name) not in CREW_LAYER


def _stage(unit: str) -> bool:
    """A subpackage other than crew/ (preprocessing, training, ..., reddit)."""
    return unit != "crew" and (PACKAGE_ROOT / unit).is_dir()


RULES: list[Rule] = [
    ("reddit/ imports nothing of fl_crew_reddit outside reddit/ (but _quiet and redact)",
     lambda a, b: part(a) == "reddit" and part(b) not in ("reddit", "_quiet", "redact")),
    ("preprocessing/ imports only preprocessing/, reddit/ and hub (and _quiet)",
     lambda a, b: part(a) == "preprocessing" and part(b) not in ("preprocessing", "reddit", "hub", "_quiet")),
    ("aggregation/ imports nothing of fl_crew_reddit outside aggregation/",
     lambda a, b: part(a) == "aggregation" and part(b) != "aggregation"),
    ("evaluation/metrics.py imports nothing of fl_crew_reddit",
     lambda a, b: a == "fl_crew_reddit.evaluation.metrics"),
    ("nothing below the crew layer imports crew/, workspace, data_source or main",
     lambda a, b: _is_stage_or_below(a) and part(a) != "__init__" and part(b) in CREW_LAYER),
    ("hub and runs import no stage and nothing of the crew layer",
     lambda a, b: part(a) in BASE_HELPERS and (_stage(part(b)) or part(b) in CREW_LAYER)),
    ("config imports only reddit/, hub and redact",
     lambda a, b: part(a) == "config" and part(b) not in ("config", "reddit", "hub", "redact")),
    ("redact imports nothing of fl_crew_reddit",
     lambda a, b: part(a) == "redact" and part(b) != "redact"),
    ("nothing imports main",
     lambda a, b: part(b) == "main" and part(a) != "main"),
    ("only crew/, main and the package's lazy export import crew/",
     lambda a, b: part(b) == "crew" and part(a) not in ("crew", "main", "__init__")),
]


def forbidden_edges(modules: Iterable[Module], rules: list[Rule] = RULES) -> list[str]:
    problems = []
    for edge in package_edges(modules):
        for text, forbidden in rules:
            if forbidden(edge.importer.name, edge.imported):
                problems.append(f"{edge}: {text}")
    return problems


def _call_name(node: ast.Call) -> str:
    """`open`, `torch.save`, or the bare method name of any other attribute call (`path.read_text` -> read_text)."""
    function = node.func
    if isinstance(function, ast.Name):
        return function.id
    if isinstance(function, ast.Attribute):
        if isinstance(function.value, ast.Name) and f"{function.value.id}.{function.attr}" in IO_CALLS:
            return f"{function.value.id}.{function.attr}"
        return function.attr
    return ""


def io_uses(module: Module) -> list[str]:
    """Imports of I/O modules and calls that touch files, in a module that must stay pure."""
    found = []
    for imported, line in imports_of(module, set()):
        if imported.split(".")[0] in IO_MODULES:
            found.append(f"{module.path}:{line} imports {imported}")
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Call) and _call_name(node) in IO_CALLS:
            found.append(f"{module.path}:{node.lineno} calls {_call_name(node)}()")
    return found


def environment_reads(module: Module) -> list[str]:
    """Uses of os.environ / getenv / putenv (as attributes of os, or imported from os)."""
    found = []
    for node in ast.walk(module.tree):
        if (isinstance(node, ast.Attribute) and node.attr in ENVIRONMENT_NAMES and isinstance(node.value, ast.Name)
                and node.value.id == "os"):
            found.append(f"{module.path}:{node.lineno} uses os.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [f"{module.path}:{node.lineno} imports os.{alias.name}" for alias in node.names
                      if alias.name in ENVIRONMENT_NAMES]
    return found


def tool_name_literals(module: Module) -> list[str]:
    names = {tool.value for tool in RedditTool}
    return [f"{module.path}:{node.lineno} spells {node.value!r}" for node in ast.walk(module.tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names]


# ---------------------------------------------------------------------------------------------- the package
MODULES = package_modules()


def _listing(problems: list[str]) -> str:
    return f"{len(problems)} forbidden:\n  " + "\n  ".join(problems)


def test_the_package_is_found_whole():
    names = {module.name for module in MODULES}
    assert {"fl_crew_reddit", "fl_crew_reddit.config", "fl_crew_reddit.reddit.client", "fl_crew_reddit.crew.flow",
            "fl_crew_reddit.aggregation.rules", "fl_crew_reddit.evaluation.metrics"} <= names
    assert len(package_edges(MODULES)) > 50


def test_no_forbidden_import_edges():
    problems = forbidden_edges(MODULES)
    assert not problems, _listing(problems)


def test_aggregation_and_metrics_do_no_io():
    pure = [m for m in MODULES if part(m.name) == "aggregation" or m.name == "fl_crew_reddit.evaluation.metrics"]
    assert len(pure) > 3
    problems = [use for module in pure for use in io_uses(module)]
    assert not problems, _listing(problems)


def test_metrics_imports_only_math_and_the_scorers():
    metrics = next(m for m in MODULES if m.name == "fl_crew_reddit.evaluation.metrics")
    problems = [f"{metrics.path}:{line} imports {name}" for name, line in imports_of(metrics, set())
                if name.split(".")[0] not in METRICS_IMPORTS]
    assert not problems, _listing(problems)


def test_only_config_reads_the_environment():
    problems = [use for module in MODULES if module.name not in ENVIRONMENT_READERS
                for use in environment_reads(module)]
    assert not problems, _listing(problems) + (
        "\nRead settings in config.py and pass them down: a child process gets its environment from the caller "
        "(config.process_environment()), cache folders come from config.cache_root(), Hub settings from "
        "config.hub_access().")


def test_tool_names_are_spelled_only_in_the_enum():
    problems = [use for module in MODULES if module.name != TOOL_NAMES_MODULE for use in tool_name_literals(module)]
    assert not problems, _listing(problems)


# ---------------------------------------------------------------------------------------------- the checks can fail
def _fake(name: str, source: str, is_package: bool = False) -> Module:
    return Module(name, name.replace(".", "/") + ".py", ast.parse(source), is_package)


def test_the_checks_find_what_they_forbid():
    modules = [
        _fake("fl_crew_reddit.reddit.client", "def f():\n    from fl_crew_reddit.config import load_config\n"),
        _fake("fl_crew_reddit.preprocessing.images", "from ..training import model_loading\n"),
        _fake("fl_crew_reddit.training", "", is_package=True),
        _fake("fl_crew_reddit.training.model_loading", "from fl_crew_reddit.crew import manager\n"),
        _fake("fl_crew_reddit.crew.manager", "from fl_crew_reddit import main\n"),
        _fake("fl_crew_reddit.main", "from fl_crew_reddit.crew.manager import run\n"),
    ]
    problems = forbidden_edges(modules)
    assert any(p.startswith("fl_crew_reddit.reddit.client -> fl_crew_reddit.config (fl_crew_reddit/reddit/client.py:2)")
               for p in problems), problems
    assert any("fl_crew_reddit.preprocessing.images -> fl_crew_reddit.training.model_loading" in p
               for p in problems), problems
    assert any("fl_crew_reddit.training.model_loading -> fl_crew_reddit.crew.manager" in p and "crew layer" in p
               for p in problems), problems
    assert any("fl_crew_reddit.crew.manager -> fl_crew_reddit.main" in p and "nothing imports main" in p
               for p in problems), problems
    assert not any(p.startswith("fl_crew_reddit.main ->") for p in problems), problems

    impure = _fake("fl_crew_reddit.aggregation.rules",
                   "import os\nfrom pathlib import Path\ndef f(p):\n    open(p)\n    torch.save({}, p)\n"
                   "    return Path(p).read_text()\n")
    assert len(io_uses(impure)) == 5
    reader = _fake("fl_crew_reddit.training.x", "import os\nfrom os import getenv\nos.environ.get('A')\n")
    assert len(environment_reads(reader)) == 2
    spelled = _fake("fl_crew_reddit.crew.tools.x", "TOOL = 'list_subreddits'\nOTHER = 'list subreddits'\n")
    assert len(tool_name_literals(spelled)) == 1
