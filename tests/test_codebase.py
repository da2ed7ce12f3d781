"""Checks anyone can run on the source tree (issues 15 and 22), in seconds and without training anything:

  * every module under src/chatfactory imports, and no two modules import each other, directly or
    round a longer circle;
  * imports only go down the layers (``LAYERS``: store/files.py and stages.py at the bottom, cli.py on top);
  * no module sets another module's state: no ``global``, no ``other_module.x = …`` under any alias;
  * no file in src is longer than 500 lines;
  * no block of six or more code lines of the same shape stands twice in src;
  * the README's layout block lists the package's folders and modules as they are, and every relative
    link of README.md and docs/*.md names a file (and a heading, where it names one);
  * ruff passes on src, tests and bench (pyproject.toml's [tool.ruff]).

Each check has a self-test on a small made-up tree, proving it can fail.

    pytest tests/test_codebase.py

The import graph is read statically with ``ast`` from every ``import`` and ``from … import`` in a
module: relative imports are resolved, and imports inside functions and under ``if __name__ ==
"__main__":`` count too (a lazy import still ties two modules together; only those under ``if
TYPE_CHECKING:`` do not, since they never run). An edge goes to the module named, or to the submodule
when ``from package import name`` names one; importing ``a.b.c`` also runs ``a/__init__`` and
``a/b/__init__``, but those implicit edges to parent packages are not drawn (every module would then
sit in a circle with its package).

The same-shape check reads Python with ``tokenize`` and the web UI's JS, CSS and HTML as text. A line's
shape is its tokens with every name, string and number replaced by a placeholder (keywords, operators
and a trailing comment, word for word, kept); blank lines, comment lines, docstrings, imports and lone
punctuation are passed over. Two blocks of six code lines match when their shapes do, except where a
block is a table (one shape on every line: the fields of a dataclass, the entries of a dict) or mostly
thin lines (``id: str``, ``x = y``, ``f(x)``, which say too little): those match only word for word.
A block shape that stands in more than eight places is an idiom, not a copy. Calibrated against the
``duplicates`` command (``cd src && duplicates --most 40``) on this tree and on older ones: it flags
the same places, with two differences on purpose. A table is not a copied block (that command lists
the twelve section fields of config.py's ``Config`` as two runs of six). And docstrings are passed
over, so two functions whose code is the same under different docstrings are found (that command
found the two HH parsers only as five lines each).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import io
import keyword
import re
import subprocess
import sys
import tokenize
from collections import defaultdict
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import ROOT

SRC = ROOT / "src"
PACKAGE = SRC / "chatfactory"
MAX_LINES = 500
MIN_RUN = 6  # code lines in a block that may not stand twice
TOO_COMMON = 8  # a block shape standing in more places than this is an idiom, not a copy
CODE_SUFFIXES = (".py", ".js", ".css", ".html")


def source_files(suffixes=None) -> list[Path]:
    """The files of src that git tracks or would (not what it ignores: build output, caches)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "."],
                                cwd=SRC, capture_output=True, check=True).stdout.decode().split("\0")
        files = [SRC / f for f in listed if f and (SRC / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but caches and build info
        files = [p for p in SRC.rglob("*") if p.is_file() and not any(
            part == "__pycache__" or part.endswith(".egg-info") for part in p.parts)]
    return sorted(p for p in files if suffixes is None or p.suffix in suffixes)


def rel(p: Path) -> str:
    return str(p.relative_to(SRC)) if SRC in p.parents else str(p)


# ---------------------------------------------------------------- imports
def module_names() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__main__`` included)."""
    out = {}
    for p in source_files((".py",)):
        if PACKAGE not in p.parents:
            continue
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(range(child.lineno, child.end_lineno + 1))
    return skip


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(module of the package it imports, line) for every import statement in the module ``name``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = _type_checking_lines(tree)
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in known:
                    out.append((sub, node.lineno))
                elif target in known:
                    out.append((target, node.lineno))
    return out


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    known = module_names()
    graph, where = {m: set() for m in known}, {}
    for m, path in known.items():
        for target, line in imports_of(m, path, known):
            if target != m:
                graph[m].add(target)
                where.setdefault((m, target), line)
    return graph, where


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle [a, b, …, a], or None (depth-first search; grey = on the current path)."""
    colour = dict.fromkeys(graph, "white")
    path: list[str] = []

    def visit(m):
        colour[m] = "grey"
        path.append(m)
        for t in sorted(graph[m]):
            if colour[t] == "grey":
                return path[path.index(t):] + [t]
            if colour[t] == "white" and (found := visit(t)):
                return found
        colour[m] = "black"
        path.pop()
        return None

    for m in sorted(graph):
        if colour[m] == "white" and (found := visit(m)):
            return found
    return None


def test_the_import_graph_is_read_as_python_resolves_it():
    known = module_names()
    edges = dict(imports_of("chatfactory.pipeline", known["chatfactory.pipeline"], known))
    assert "chatfactory.config" in edges and "chatfactory.eval.heldout" in edges  # relative, one and two dots
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    graph, where = import_graph()
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle) + " (" + "; ".join(
        f"{rel(module_names()[a])}:{where[a, b]} imports {b}" for a, b in zip(circle, circle[1:])) + ")"


def test_every_module_imports():
    failed = []
    for name in module_names():
        if name.endswith("__main__"):
            continue  # running it is the CLI itself
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - every failure is reported, with its module
            failed.append(f"{name}: {type(e).__name__}: {e}")
    assert not failed, "modules that do not import:\n" + "\n".join(failed)


# ---------------------------------------------------------------- size
def test_no_file_over_500_lines():
    long = [(rel(p), n) for p in source_files() if (n := len(p.read_bytes().splitlines())) > MAX_LINES]
    assert not long, f"files in src over {MAX_LINES} lines: " + ", ".join(f"{p} ({n})" for p, n in long)


# ---------------------------------------------------------------- same-shape blocks
_FSTRING_START = getattr(tokenize, "FSTRING_START", -1)  # Python 3.12+ splits an f-string into tokens
_FSTRING_END = getattr(tokenize, "FSTRING_END", -1)
_FSTRING_MIDDLE = getattr(tokenize, "FSTRING_MIDDLE", -1)
_LAYOUT = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER}


def _placeholder(kind: int, text: str) -> str:
    """A name becomes ``x``, a string ``s``, a number ``0`` (``0e-0`` with a signed exponent, which a
    reader sees as a different thing: ``5e-4`` is not ``1.0``); keywords, operators and punctuation stay."""
    if kind == tokenize.NAME:
        return text if keyword.iskeyword(text) or keyword.issoftkeyword(text) else "x"
    if kind == tokenize.NUMBER:
        return "0e-0" if re.search(r"[eE][-+]", text) else "0"
    if kind in (tokenize.STRING, _FSTRING_START):
        return "s"
    return text


def python_lines(path: Path) -> list[tuple[int, str, str]]:
    """(line number, shape, text) of each code line of a Python file: not blank, a comment, a docstring
    or other bare string, an import, or lone punctuation. A trailing comment stays, word for word."""
    source = path.read_text(encoding="utf-8")
    passed = set()
    for node in ast.walk(ast.parse(source)):
        bare_string = (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                       and isinstance(node.value.value, str))
        if bare_string or isinstance(node, (ast.Import, ast.ImportFrom)):
            passed.update(range(node.lineno, node.end_lineno + 1))
    shape: dict[int, list[str]] = defaultdict(list)
    text: dict[int, list[str]] = defaultdict(list)
    in_fstring = 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        n = tok.start[0]
        if tok.type in _LAYOUT or n in passed or (tok.type == tokenize.COMMENT and not shape.get(n)):
            continue
        word = " ".join(tok.string.split()) if tok.type == tokenize.COMMENT else _placeholder(tok.type, tok.string)
        if not in_fstring:
            shape[n].append(word)
            text[n].append(tok.string)
        in_fstring += (tok.type == _FSTRING_START) - (tok.type == _FSTRING_END)
    return [(n, " ".join(shape[n]), " ".join(text[n])) for n in sorted(shape) if re.search(r"\w", " ".join(shape[n]))]


_TEXT_TOKEN = re.compile(r"""("(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`(?:\\.|[^`\\])*`)"""
                         r"""|(\d+(?:\.\d+)?)|([A-Za-z_$][\w$-]*)|(\S)""")
_JS_KEYWORDS = set("""break case catch class const continue default delete do else export extends finally for function
if import in instanceof let new of return switch this throw try typeof var void while with yield async await""".split())


def text_lines(path: Path) -> list[tuple[int, str, str]]:
    """(line number, shape, text) of each code line of a JS, CSS or HTML file, comments removed."""
    source = path.read_text(encoding="utf-8")
    blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))  # noqa: E731 - keeps the line numbers
    source = re.sub(r"/\*.*?\*/|<!--.*?-->", blank, source, flags=re.S)
    out = []
    for n, line in enumerate(source.splitlines(), 1):
        line = re.sub(r"^\s*//.*", "", line)
        if re.match(r"\s*import\b", line):
            continue
        parts = ["s" if string else "0" if number else (name if name in _JS_KEYWORDS else "x") if name else other
                 for string, number, name, other in _TEXT_TOKEN.findall(line)]
        if re.search(r"\w", " ".join(parts)):
            out.append((n, " ".join(parts), " ".join(line.split())))
    return out


def _thin(shape: str) -> bool:
    """A line with fewer than four tokens besides brackets, dots, commas and colons (``id: str``,
    ``x = y``, ``f(x)``): two such lines of one shape are not yet one line copied."""
    return sum(t not in "()[]{}.,:" for t in shape.split()) < 4


def same_shape_blocks(paths: list[Path], min_run: int = MIN_RUN) -> list[str]:
    """Every pair of places sharing a run of ``min_run`` or more code lines of the same shape, as
    ``a.py:10-24 ~ b.py:40-54`` (first and last line of each place). A block that is a table (one
    shape throughout) or mostly thin lines counts only where it is copied word for word."""
    code = {p: (python_lines(p) if p.suffix == ".py" else text_lines(p)) for p in paths}
    places = defaultdict(list)  # a block's shape (or its text) -> [(file, index of its first code line)]
    for p, lines in code.items():
        for i in range(len(lines) - min_run + 1):
            shapes = tuple(shape for _, shape, _ in lines[i:i + min_run])
            if len(set(shapes)) == 1 or 2 * sum(map(_thin, shapes)) > min_run:
                places[("text",) + tuple(text for _, _, text in lines[i:i + min_run])].append((p, i))
            else:
                places[shapes].append((p, i))
    matches = set()  # (file a, file b, offset, index in a): window i of a stands again at i + offset of b
    for spots in places.values():
        if len(spots) > TOO_COMMON:
            continue
        for j, (pa, ia) in enumerate(spots):
            for pb, ib in spots[j + 1:]:
                if pa != pb or ib - ia >= min_run:  # two places, not one run overlapping itself
                    matches.add((rel(pa), rel(pb), ib - ia, ia, pa, pb))
    runs, last = [], None
    for a, b, offset, i, pa, pb in sorted(matches):
        if last == (a, b, offset, i - 1):  # the same run, one line further
            runs[-1][1] = i
        else:
            runs.append([(a, b, offset, i, pa, pb), i])
        last = (a, b, offset, i)
    rows = []
    for (a, b, offset, first, pa, pb), end in runs:
        la, lb = code[pa], code[pb]
        rows.append(f"{a}:{la[first][0]}-{la[end + min_run - 1][0]} ~ "
                    f"{b}:{lb[first + offset][0]}-{lb[end + offset + min_run - 1][0]}")
    return rows


def test_the_shape_check_sees_a_renamed_copy_and_passes_tables_and_thin_lines(tmp_path):
    body = """
def {f}(rows, n):
    out = []
    for r in rows[:{k}]:
        if r["{key}"] > n:
            out.append(r["{key}"] * 2)
        total = sum(out) + {k}
    return out, total
"""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(body.format(f="first", k=1, key="x"))
    b.write_text('"""A docstring."""\nimport os\n\n# a comment\n' + body.format(f="second", k=7, key="y"))
    assert same_shape_blocks([a, b]) == [f"{a}:2-8 ~ {b}:6-12"]
    table = tmp_path / "table.py"  # one shape on every line
    table.write_text("class C:\n" + "".join(f"    f{i}: int = field(default={i})\n" for i in range(14)))
    models = [tmp_path / "m1.py", tmp_path / "m2.py"]  # thin lines: alike only in shape, then word for word
    fields = ("class {c}(Base):\n    id: str\n    object: Literal['{c}']\n    created: int\n    model: str\n"
              "    usage: {u}\n")
    models[0].write_text(fields.format(c="Chat", u="Usage"))
    models[1].write_text(fields.format(c="Text", u="Tokens"))
    assert same_shape_blocks([table] + models) == []
    models[1].write_text(fields.format(c="Chat", u="Usage"))
    assert same_shape_blocks(models) == [f"{models[0]}:1-6 ~ {models[1]}:1-6"]


def test_no_block_of_six_lines_stands_twice():
    rows = same_shape_blocks(source_files(CODE_SUFFIXES))
    assert not rows, (f"blocks of {MIN_RUN}+ code lines of the same shape standing twice in src "
                      "(one piece of code could serve both):\n" + "\n".join(rows))


# ---------------------------------------------------------------- layers: imports only go down
# Bottom to top. An entry is a module ("stages.py") or a folder ("model/": every module in it, at any depth);
# a module belongs to the most specific entry that holds its file. A module may import modules of its own
# entry and of lower layers, never another entry of its own layer or one above: config.py, store/ and text/
# stand side by side and meet only below them (store/files.py, stages.py, model/). pipeline.py sits below
# cli.py, which calls it for `chatfactory run`; the package's own __init__.py, its front door
# (``from chatfactory import …``), may re-export any layer, so nothing inside the package imports it.
LAYERS = (
    ("store/files.py", "stages.py"),  # leaves: import nothing of the project
    ("model/",),
    ("config.py", "store/", "text/"),
    ("formats/",),
    ("inference/",),
    ("data/",),
    ("train/",),
    ("eval/",),
    ("serve/",),
    ("pipeline.py", "learn.py"),
    ("cli.py", "__init__.py"),
)


def layer_of(path: Path, package: Path = PACKAGE, layers=LAYERS) -> tuple[int, str] | None:
    """(rank, entry) of a module's file: the most specific entry of the table holding it; None if none does."""
    inside = path.relative_to(package).as_posix()
    found = [(len(entry), rank, entry) for rank, row in enumerate(layers) for entry in row
             if inside == entry or (entry.endswith("/") and inside.startswith(entry))]
    return max(found)[1:] if found else None


def imports_not_going_down(known: dict[str, Path], graph: dict[str, set[str]], where: dict[tuple[str, str], int],
                           package: Path = PACKAGE, layers=LAYERS) -> list[str]:
    """Every import that does not go down the table, as ``file:line: a (layer) imports b (layer)``, and
    every module the table does not place."""
    out = []
    for a in sorted(graph):
        la = layer_of(known[a], package, layers)
        if la is None:
            out.append(f"{rel(known[a])}: {a} is in no layer (name it in LAYERS, or move it into a layer's folder)")
            continue
        for b in sorted(graph[a]):
            lb = layer_of(known[b], package, layers)
            if lb is not None and (lb[0] < la[0] or lb[1] == la[1]):
                continue
            what = "no layer" if lb is None else f"layer {lb[0]} {lb[1]}" + (
                ", the same layer" if lb[0] == la[0] else ", a layer above")
            out.append(f"{rel(known[a])}:{where[a, b]}: {a} (layer {la[0]} {la[1]}) imports {b} ({what})")
    return out


def _tree(root: Path, files: dict[str, str]) -> dict[str, Path]:
    """Write ``files`` (path under root -> text) and return their module names, as module_names() does."""
    known = {}
    for f, text in files.items():
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text(text)
        parts = list(Path(f).with_suffix("").parts)
        known[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = root / f
    return known


def test_the_layer_check_sees_upward_sideways_and_unplaced_modules(tmp_path):
    pkg = tmp_path / "chatfactory"
    known = _tree(tmp_path, {
        "chatfactory/stages.py": "",
        "chatfactory/store/files.py": "from .. import stages\n",  # a leaf importing its neighbour
        "chatfactory/store/checkpoint.py": "from . import files\nfrom ..model import gpt\n",  # down: fine
        "chatfactory/model/gpt.py": "import chatfactory.store.checkpoint as C\n",  # up
        "chatfactory/text/tokenizer.py": "def f():\n    from ..config import Config\n",  # sideways, lazily
        "chatfactory/config.py": "",
        "chatfactory/extra.py": "from .stages import X\n",  # placed nowhere
    })
    graph = {m: {t for t, _ in imports_of(m, p, known)} for m, p in known.items()}
    where = {(m, t): n for m, p in known.items() for t, n in imports_of(m, p, known)}
    rows = imports_not_going_down(known, graph, where, pkg)
    assert [r.replace(str(tmp_path) + "/", "") for r in rows] == [
        "chatfactory/extra.py: chatfactory.extra is in no layer (name it in LAYERS, or move it into a layer's folder)",
        "chatfactory/model/gpt.py:1: chatfactory.model.gpt (layer 1 model/) imports chatfactory.store.checkpoint "
        "(layer 2 store/, a layer above)",
        "chatfactory/store/files.py:1: chatfactory.store.files (layer 0 store/files.py) imports chatfactory.stages "
        "(layer 0 stages.py, the same layer)",
        "chatfactory/text/tokenizer.py:2: chatfactory.text.tokenizer (layer 2 text/) imports chatfactory.config "
        "(layer 2 config.py, the same layer)",
    ]


def test_imports_only_go_down_the_layers():
    graph, where = import_graph()
    rows = imports_not_going_down(module_names(), graph, where)
    assert not rows, ("imports that do not go down the layers (bottom to top: " + " -> ".join(
        ", ".join(row) for row in LAYERS) + "):\n" + "\n".join(rows))


# ---------------------------------------------------------------- module state set from other modules
# Loading decisions once passed through module globals that context managers in other modules set
# (``checkpoint.quantized_loader = …``). A module's state is its own: no ``global`` statement in src, and
# no module writes into another module of the package: not an attribute (``_load.stream_loader = …``,
# ``setattr(checkpoint, …)``, ``del gpt.X``), not something reachable from one (``checkpoint.HOOKS[k] = …``,
# ``quant.Config.bits = …``), not a mutable object it exported (``from .checkpoint import HOOKS;
# HOOKS.append(…)``). A module is recognised under any name it is bound to: ``import chatfactory.store.load
# as L``, ``from ..store import load as _load``, ``import chatfactory.store.load`` (then
# ``chatfactory.store.load.x``), ``L = importlib.import_module("chatfactory.store.load")``, ``M = L``.
# Functions are scopes: a name a function binds itself (an argument, a local) hides the module's alias.
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_MUTATORS = {"append", "extend", "insert", "remove", "pop", "popitem", "clear", "update", "setdefault", "add",
             "discard", "sort", "reverse", "__setitem__", "__delitem__", "__setattr__", "__delattr__"}


def _in_scope(node: ast.AST):
    """The nodes of one scope: children, grandchildren, … but not the insides of a nested function or class."""
    for child in ast.iter_child_nodes(node):
        yield child
        if not isinstance(child, _SCOPES):
            yield from _in_scope(child)


def _targets(node: ast.AST):
    """The single targets of an assignment, ``del``, ``for`` or ``with … as`` (tuples and stars unpacked)."""
    if isinstance(node, (ast.Tuple, ast.List)):
        for e in node.elts:
            yield from _targets(e)
    elif isinstance(node, ast.Starred):
        yield from _targets(node.value)
    else:
        yield node


def writes_into_other_modules(name: str, path: Path, known: dict[str, Path]) -> list[str]:
    """``file:line: what`` for every ``global`` statement of the module ``name`` and every write it makes
    into another module of the package (see above)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {m.split(".")[0] for m in known}
    out = []

    def owner(dotted: str | None) -> str | None:
        """The other module of the package whose state ``dotted`` (a module, then attributes) reaches into."""
        if not dotted:
            return None
        parts = dotted.split(".")
        for n in range(len(parts) - 1, 0, -1):  # the longest module prefix, with something beyond it
            if ".".join(parts[:n]) in known:
                return ".".join(parts[:n]) if ".".join(parts[:n]) != name else None
        return None

    def resolve(expr: ast.AST, aliases: dict[str, str]) -> str | None:
        """The dotted path of the package's object an expression names (``mod.X[]`` for a subscript)."""
        if isinstance(expr, ast.Name):
            return aliases.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = resolve(expr.value, aliases)
            return base and f"{base}.{expr.attr}"
        if isinstance(expr, ast.Subscript):
            base = resolve(expr.value, aliases)
            return base and f"{base}.[]"
        if isinstance(expr, ast.Call) and expr.args:
            fn = ast.unparse(expr.func)
            first = expr.args[0]
            if fn.endswith("import_module") and isinstance(first, ast.Constant) and first.value in known:
                return first.value
            if fn == "vars":
                base = resolve(first, aliases)
                return base and f"{base}.__dict__"
        return None

    def imported(node: ast.AST) -> list[tuple[str, str]]:
        """(name bound, dotted path of what it is bound to) for an import of the package's modules."""
        if isinstance(node, ast.Import):
            return [(a.asname, a.name) if a.asname else (a.name.split(".")[0],) * 2 for a in node.names
                    if a.name.split(".")[0] in top and (not a.asname or a.name in known)]
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                target = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            return [(a.asname or a.name, f"{target}.{a.name}") for a in node.names
                    if target in known or f"{target}.{a.name}" in known]
        return []

    def report(node: ast.AST, dotted: str | None, what: str):
        if (other := owner(dotted)) is not None:
            out.append(f"{rel(path)}:{node.lineno}: {what} writes into {other}")

    def scan(scope: ast.AST, outer: dict[str, str]):
        local = {n.id for n in _in_scope(scope) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
        local |= {n.name for n in _in_scope(scope) if isinstance(n, _SCOPES) and not isinstance(n, ast.Lambda)}
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            local |= {a.arg for a in ast.walk(scope.args) if isinstance(a, ast.arg)}
        aliases = {k: v for k, v in outer.items() if k not in local}
        for node in _in_scope(scope):
            aliases.update(imported(node))
        for _ in range(2):  # ``L = importlib.import_module(…)``, then ``M = L``
            for node in _in_scope(scope):
                if isinstance(node, ast.Assign) and (dotted := resolve(node.value, aliases)) in known:
                    aliases.update((t.id, dotted) for t in node.targets if isinstance(t, ast.Name))
        for node in _in_scope(scope):
            if isinstance(node, ast.Global):
                out.append(f"{rel(path)}:{node.lineno}: global {', '.join(node.names)} (module state set from a "
                           "function: pass it as an argument, or keep it in an object)")
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete, ast.For, ast.AsyncFor)):
                tops = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                for t in (t for top_ in tops for t in _targets(top_)):
                    if isinstance(t, (ast.Attribute, ast.Subscript)):
                        text = f"del {ast.unparse(t)}" if isinstance(node, ast.Delete) else f"{ast.unparse(t)} = …"
                        report(node, resolve(t, aliases), text)
            elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                for t in _targets(node.optional_vars):
                    if isinstance(t, (ast.Attribute, ast.Subscript)):
                        report(t, resolve(t, aliases), f"with … as {ast.unparse(t)}")
            elif isinstance(node, ast.Call):
                fn = node.func
                if isinstance(fn, ast.Name) and fn.id in ("setattr", "delattr") and node.args:
                    dotted = resolve(node.args[0], aliases)
                    report(node, dotted and f"{dotted}.?", f"{fn.id}({ast.unparse(node.args[0])}, …)")
                elif isinstance(fn, ast.Attribute) and fn.attr in _MUTATORS:
                    report(node, resolve(fn.value, aliases), f"{ast.unparse(fn)}(…)")
            if isinstance(node, _SCOPES):
                scan(node, aliases)

    scan(tree, {})
    return out


def test_the_state_check_sees_writes_into_other_modules_under_any_name(tmp_path):
    known = _tree(tmp_path, {
        "chatfactory/__init__.py": "", "chatfactory/store/__init__.py": "", "chatfactory/model/gpt.py": "",
        "chatfactory/store/load.py": "HOOKS = []\nx = 1\n",
        "chatfactory/store/checkpoint.py": "import chatfactory.store.checkpoint as me\n\nme.mine = 1\n",  # its own
        "chatfactory/cli.py": """
import importlib
import chatfactory.store.load
import chatfactory.store.load as L
from .store import load as _load
from .store.load import HOOKS
from .model.gpt import GPT

STATE = {}
chatfactory.store.load.x = 1
L.stream_loader = 2
_load.a, (_load.b, c) = 3, (4, 5)
del _load.x
HOOKS.append(6)
GPT.bits = 4
setattr(L, "quantize_on_load", True)
vars(_load)["y"] = 7
M = importlib.import_module("chatfactory.store.load")
N = M
N.z += 1


def loader(rows, _load):
    global STATE
    from .store import checkpoint
    checkpoint.quantized_loader = rows
    _load.x = 8  # an argument, not the module
    STATE["k"] = 9  # its own state
    rows.append(10)


class Quiet:
    def __init__(self, load):
        load.x = 11  # an argument again
        self.L = L
""",
    })
    rows = [r.split(": ", 1)[1] for r in writes_into_other_modules("chatfactory.cli", known["chatfactory.cli"], known)]
    load = "writes into chatfactory.store.load"
    assert rows == [
        f"chatfactory.store.load.x = … {load}",
        f"L.stream_loader = … {load}",
        f"_load.a = … {load}",
        f"_load.b = … {load}",
        f"del _load.x {load}",
        f"HOOKS.append(…) {load}",
        "GPT.bits = … writes into chatfactory.model.gpt",
        f"setattr(L, …) {load}",
        f"vars(_load)['y'] = … {load}",
        f"N.z = … {load}",
        "global STATE (module state set from a function: pass it as an argument, or keep it in an object)",
        "checkpoint.quantized_loader = … writes into chatfactory.store.checkpoint",
    ]
    me = "chatfactory.store.checkpoint"
    assert writes_into_other_modules(me, known[me], known) == []


def test_no_module_state_set_from_other_modules():
    known = module_names()
    rows = [r for m, p in known.items() for r in writes_into_other_modules(m, p, known)]
    assert not rows, ("module state set from outside the module (a decision passes as an argument, not "
                      "through another module's globals):\n" + "\n".join(rows))


# ---------------------------------------------------------------- the README's tree, the docs' links
# README.md's "## Layout" holds a fenced block: ``src/chatfactory/`` and, two spaces deeper a level, every
# folder ("name/") and Python module of the package but ``__init__.py``, each followed by two or more spaces
# and a description (the presets' YAML and the web UI's static files are named only in their folder's line);
# then, unindented, other folders of the repository (tests/, bench/, docs/).
README = ROOT / "README.md"
_TREE_LINE = re.compile(r"( *)([^ ]+)  +\S.*")


def layout_block(markdown: str) -> list[tuple[int, str]]:
    """(line number, line) of the first fenced block under the "## Layout" heading; [] if there is none."""
    lines, inside, block = markdown.splitlines(), False, []
    for n, line in enumerate(lines, 1):
        if line.startswith("## "):
            if inside and block:
                break
            inside = line.strip() == "## Layout"
        elif inside and line.startswith("```"):
            if block:
                return block[1:]
            block.append((n, line))
        elif block:
            block.append((n, line))
    return []


def tree_differences(markdown: str, tracked: list[str], root: Path, package: str = "src/chatfactory/") -> list[str]:
    """What the README's layout block and the tracked files (paths relative to ``root``) disagree on."""
    block = layout_block(markdown)
    if not block or block[0][1].split()[:1] != [package]:
        return [f"README: no fenced block under '## Layout' whose first line names {package}"]
    problems, listed, stack = [], {}, []
    for n, line in block:
        m = _TREE_LINE.fullmatch(line)
        depth = len(m.group(1)) // 2 if m else -1
        if not m or len(m.group(1)) % 2 or depth > len(stack) or (depth and not stack[depth - 1].endswith("/")):
            problems.append(f"README.md:{n}: not 'name' or 'folder/' two spaces deeper than its folder at most, "
                            f"then two spaces and a description: {line!r}")
            continue
        stack = stack[:depth] + [m.group(2)]
        listed["".join(stack)] = n
    expected = set()
    for f in tracked:
        if f.startswith(package):
            parts = f.split("/")
            expected.update("/".join(parts[:i]) + "/" for i in range(package.count("/"), len(parts)))
            if f.endswith(".py") and parts[-1] != "__init__.py":
                expected.add(f)
    allowed = expected | set(tracked)
    problems += [f"README.md: {p} is not in the layout block" for p in sorted(expected - set(listed))]
    for p, n in sorted(listed.items(), key=lambda item: item[1]):
        there = (root / p).is_dir() if p.endswith("/") else (root / p).is_file()
        if (p not in allowed) if p.startswith(package) else not (there and any(f.startswith(p) for f in tracked)):
            problems.append(f"README.md:{n}: {p} is listed but not in the tree")
    return problems


def tracked_files(root: Path = ROOT) -> list[str]:
    """The repository's files that git tracks or would, relative to its root (source_files, for the repo)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                cwd=root, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but caches and build output
        listed = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not any(
            part in (".git", ".venv", "__pycache__", "runs") or part.endswith(".egg-info") for part in p.parts)]
    return sorted(f for f in listed if f and (root / f).exists())


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: the text, lower case, punctuation but - and _ dropped, spaces -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _prose(markdown: str, code: bool = False) -> list[tuple[int, str]]:
    """(line number, line) outside fenced blocks, inline code removed unless ``code``."""
    out, fenced = [], False
    for n, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced:
            out.append((n, line if code else re.sub(r"`[^`]*`", "", line)))
    return out


def anchors(path: Path) -> set[str]:
    seen, out = defaultdict(int), set()
    for _, line in _prose(path.read_text(encoding="utf-8"), code=True):
        if m := re.match(r"#{1,6} +(.*?) *#* *$", line):
            slug = _slug(m.group(1))
            out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return out


_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)"  # [text](target "title")
                   r"|^ {0,3}\[[^\]]+\]:\s*(\S+)")  # [label]: target


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: target (why)`` for each relative link of a Markdown file that names no file in the
    repository, or a heading its file does not have."""
    out = []
    for n, line in _prose(path.read_text(encoding="utf-8")):
        for m in _LINK.finditer(line):
            target = m.group(1) if m.group(1) is not None else m.group(2)
            if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith("//"):
                continue  # http:, https:, mailto:: not a file here
            file, _, anchor = target.partition("#")
            to = (path.parent / unquote(file)).resolve() if file else path
            where = f"{rel(path) if SRC in path.parents else path.relative_to(root)}:{n}: {target}"
            if root.resolve() not in to.parents and to != root.resolve():
                out.append(f"{where} (outside the repository)")
            elif not to.exists():
                out.append(f"{where} (no such file)")
            elif anchor and to.suffix == ".md" and anchor not in anchors(to):
                out.append(f"{where} (no heading with that anchor in {to.name})")
    return out


def test_the_tree_check_sees_a_module_missing_a_stale_line_and_a_bad_indent(tmp_path):
    (tmp_path / "docs").mkdir()
    tracked = ["src/chatfactory/__init__.py", "src/chatfactory/cli.py", "src/chatfactory/model/gpt.py",
               "src/chatfactory/serve/static/app.js", "docs/a.md"]
    readme = ("# x\n\n## Layout\n\nThe tree:\n\n```\nsrc/chatfactory/    the package\n  cli.py            the CLI\n"
              "  model/            the network\n    gpt.py          the GPT\n  serve/            the server\n"
              "    static/         the web UI: app.js\ndocs/               pages\n```\n\n## Next\n")
    assert tree_differences(readme, tracked, tmp_path) == []
    stale = readme.replace("    gpt.py          the GPT\n", "    lora.py         adapters\n")
    assert tree_differences(stale, tracked, tmp_path) == [
        "README.md: src/chatfactory/model/gpt.py is not in the layout block",
        "README.md:11: src/chatfactory/model/lora.py is listed but not in the tree"]
    bad = readme.replace("  cli.py            the CLI", "   cli.py the CLI").replace("docs/ ", "bench/")
    assert tree_differences(bad, tracked, tmp_path) == [
        "README.md:9: not 'name' or 'folder/' two spaces deeper than its folder at most, then two spaces and a "
        "description: '   cli.py the CLI'",
        "README.md: src/chatfactory/cli.py is not in the layout block",
        "README.md:14: bench/ is listed but not in the tree"]
    assert tree_differences("# x\n", tracked, tmp_path) == [
        "README: no fenced block under '## Layout' whose first line names src/chatfactory/"]
    page = tmp_path / "docs" / "a.md"
    page.write_text("# A page\n\n## Measured: SmolLM2-135M, `int8`\n\nSee [b](b.md), [top](../README.md#layout), "
                    "[here](#measured-smollm2-135m-int8), [gone](#measured), [web](https://x.org/a.md), "
                    "`[code](c.md)`, [out](../../elsewhere.md).\n\n```\n[fenced](d.md)\n```\n[ref]: e.md\n")
    (tmp_path / "README.md").write_text(readme)
    assert broken_links(page, tmp_path) == [
        "docs/a.md:5: b.md (no such file)", "docs/a.md:5: #measured (no heading with that anchor in a.md)",
        "docs/a.md:5: ../../elsewhere.md (outside the repository)", "docs/a.md:10: e.md (no such file)"]


def test_the_readme_tree_is_the_real_one():
    problems = tree_differences(README.read_text(encoding="utf-8"), tracked_files(), ROOT)
    assert not problems, "README.md's layout block and the tree differ:\n" + "\n".join(problems)


def test_every_relative_link_of_the_readme_and_docs_names_a_file():
    rows = [r for page in [README, *sorted((ROOT / "docs").glob("*.md"))] for r in broken_links(page)]
    assert not rows, "relative links to nothing:\n" + "\n".join(rows)


# ---------------------------------------------------------------- ruff
RUFF_MISSING = "ruff is not installed: pip install -e '.[dev]' (the dev extras pin the ruff `make test` runs)"


def ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("ruff") is None:
        pytest.skip(RUFF_MISSING)
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", *args],
                          cwd=cwd, capture_output=True, text=True)


def test_the_ruff_check_fails_an_unused_import_and_a_long_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\nx = [" + "1, " * 37 + "111]\ny = [" + "1, " * 37 + "1111]\n")  # 120 and 121 long
    r = ruff("--config", str(ROOT / "pyproject.toml"), "--no-cache", str(bad))
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.findall(r"bad\.py:(\d+):\d+: (\w+)", r.stdout) == [("1", "F401"), ("4", "E501")], r.stdout


def test_ruff_is_clean():
    r = ruff("src", "tests", "bench")
    assert r.returncode == 0, "ruff check src tests bench (config: pyproject.toml [tool.ruff]):\n" + r.stdout + r.stderr
