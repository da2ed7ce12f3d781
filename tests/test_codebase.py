"""Checks anyone can run on the source tree (issue 15), in a few seconds and without training anything:

  * every module under src/chatfactory imports, and no two modules import each other, directly or
    round a longer circle;
  * no file in src is longer than 500 lines;
  * no block of six or more code lines of the same shape stands twice in src.

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
import io
import keyword
import re
import subprocess
import tokenize
from collections import defaultdict
from pathlib import Path

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
