"""The embedded default's pretraining text: built at run time from what every Python carries.

No download and no file in the repo: the reference documentation in ``pydoc_data.topics`` (the
language reference, ~0.5 MB of English prose with code) and the docstrings of the standard library's
modules, classes and functions (~1.6 MB), read with ``ast`` so nothing is imported or executed.
Documents come in a fixed order, so a given Python version always yields the same text. All of it is
English: the Chinese the model and the tokenizer meet is the bilingual tasks' text (data/tasks.py's
``pretrain_texts``, sft and rl splits only), which ``data.source: embedded+tasks`` spreads through it.

    from chatfactory.data.embedded import embedded_texts
    for doc in embedded_texts(): ...
"""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator

# test suites, GUIs and vendored trees add little prose and much noise
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "idlelib", "lib2to3",
              "turtledemo", "ensurepip", "__pycache__", "tkinter", "pydoc_data", "encodings"}


def pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()


def stdlib_docstrings() -> Iterator[str]:
    """One document per module: its dotted name, then every docstring in it, in source order."""
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = os.path.join(dirpath, fn)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            parts = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        title = "" if isinstance(node, ast.Module) else f"{node.name}:\n"
                        parts.append(title + doc.strip())
            if parts:
                module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                yield f"Module {module}\n\n" + "\n\n".join(parts)


def embedded_texts() -> Iterator[str]:
    yield from pydoc_topics()
    yield from stdlib_docstrings()
