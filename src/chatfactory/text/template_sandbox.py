"""A bounded Jinja sandbox for chat templates that come with model files (text/chat_template.py renders them).

Jinja's ``SandboxedEnvironment`` stops a template from reaching Python's internals, but not from doing
unbounded work: ``'a' * 10**10`` is folded to a constant when the template compiles, and nested ``range``
loops can run for hours. A template from a downloaded model is untrusted input, so here every render is
bounded by ``TemplateLimits``: wall time, loop iterations, output size, and the size of any string or
sequence an operator, filter or ``%``/``format`` would build, checked before it is built. Constants are
sized at load (``check_constants``) and never folded by the compiler, so a template bomb is refused when
the run is opened, naming its line and the limit, not when a request meets it.

    text = render(source, TemplateLimits(), messages=[...], add_generation_prompt=True)
"""

from __future__ import annotations

import json
import operator
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache


@dataclass(frozen=True)
class TemplateLimits:
    """What one render of a chat template may cost. A template comes from model files (an imported
    model's GGUF or ``tokenizer_config.json``), so it is code from elsewhere: Jinja's sandbox keeps it
    from reaching Python's internals, and these bound the work it may do (``_bounded_env``)."""
    seconds: float = 2.0  # wall-clock time of one render
    output_chars: int = 4_000_000  # the rendered text, and any one string or list it builds
    loop_iterations: int = 1_000_000  # loop iterations of one render, every loop together
    int_argument: int = 10_000  # the largest width or count a call or filter may be given (range: as Jinja's)
    int_bits: int = 4096  # the largest integer arithmetic may make


class TemplateBudgetError(ValueError):
    """A template went past its ``TemplateLimits`` (at load, or rendering a conversation)."""


class _Budget:
    """One render's spending: loop iterations, time and output so far."""

    def __init__(self, limits: TemplateLimits):
        self.limits, self.iterations, self.output = limits, 0, 0
        self.deadline = time.monotonic() + limits.seconds

    def tick(self, n: int = 1) -> None:
        self.iterations += n
        if self.iterations > self.limits.loop_iterations:
            raise TemplateBudgetError(f"chat template ran more than {self.limits.loop_iterations:,} loop iterations")
        if time.monotonic() > self.deadline:
            raise TemplateBudgetError(f"chat template took longer than {self.limits.seconds:g} s to render")

    def emit(self, piece: str) -> None:
        self.output += len(piece)
        if self.output > self.limits.output_chars:
            raise TemplateBudgetError(f"chat template output is over {self.limits.output_chars:,} characters")
        self.tick(0)


_BUDGET: ContextVar[_Budget | None] = ContextVar("chat_template_budget", default=None)
_FORMAT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
FOLD = {"*": operator.mul, "**": operator.pow, "+": operator.add, "%": operator.mod}  # constants, once sized


def _too_big(what: str, size: int, limit: int) -> TemplateBudgetError:
    return TemplateBudgetError(f"chat template would build {what} of {size:,} (the limit is {limit:,})")


def measure(value, limit: int) -> int:
    """Roughly how many characters ``str(value)`` prints (strings their length, containers one per element
    and their contents, shared parts each time they appear), counted only up to ``limit``: a list that holds
    itself twice at each of 40 levels is refused after ``limit`` steps, not printed."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple, set, frozenset, dict)):
            total += 2 + len(v)
            if total <= limit:
                stack.extend(v.items() if isinstance(v, dict) else v)
        else:
            total += 8
        if total > limit:
            raise _too_big("a value", total, limit)
    return total


def _check_int(v, limits: TemplateLimits, what: str) -> None:
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > limits.int_argument:
        raise TemplateBudgetError(f"chat template passes {v:,} to {what} (the limit is {limits.int_argument:,})")


def _percent_size(fmt: str, args, limits: TemplateLimits) -> None:
    """``fmt % args``: refuse field widths and precisions past ``int_argument`` before formatting."""
    star = iter(a for a in (args if isinstance(args, tuple) else (args,)) if isinstance(a, int))
    for g in (g for m in _FORMAT_SPEC.finditer(fmt) for g in m.groups() if g):
        _check_int(next(star, 0) if g == "*" else int(g), limits, "a '%' format")
    measure(args, limits.output_chars)


def _expansion(name: str, s: str, args, kwargs, limits: TemplateLimits) -> None:
    """Refuse a string method or filter whose result would pass ``output_chars``, before it runs."""
    cap = limits.output_chars
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        n = s.count(args[0]) if args[0] else len(s) + 1
        n = min(n, args[2]) if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0 else n
        size = len(s) + n * max(0, len(args[1]) - len(args[0]))
    elif name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        size = len(s) + (s.count("\n") + 1) * (len(width) if isinstance(width, str) else int(width))
    elif name == "expandtabs":
        size = len(s) + s.count("\t") * int(args[0] if args else kwargs.get("tabsize", 8))
    elif name in ("format", "format_map"):
        size = max(int(n) for n in re.findall(r"\d+", "".join(re.findall(r"\{[^{}]*\}", s))) or [0])
        _check_int(size, limits, f"str.{name}")
        size = len(s) + sum(measure(a, cap) for a in (*args, *kwargs.values()))
    else:
        return
    if size > cap:
        raise _too_big(f"a string ({name})", size, cap)


def _bounded_env(limits: TemplateLimits):
    """Jinja's immutable sandbox, bounded by ``limits``: every loop iteration, call and filter counts against
    the render's time; ``*``, ``+``, ``**`` and ``%`` refuse results past the limits before computing them
    (and are not folded when the template compiles); widths and counts given to calls and filters are
    capped, string methods that multiply their input (replace, indent, …) are sized first; the output and
    every ``~`` are measured as they grow. Constants alone past the limits (``'a' * 10**10``, loops nested
    past the iteration budget) are refused at load (``check_constants``)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

    def tick():
        budget = _BUDGET.get()
        if budget is not None:
            budget.tick(0)

    def checked(name: str, fn, args, kwargs, values):
        tick()
        if fn is not safe_range:  # range: Jinja's own cap (MAX_RANGE) and the loop budget
            for v in (*values[1:], *kwargs.values()):
                _check_int(v, limits, name)
        for v in (*values, *kwargs.values()):
            measure(v, limits.output_chars)
        if values and isinstance(values[0], str):
            _expansion(name.removeprefix("the ").removesuffix(" filter"), values[0], tuple(values[1:]), kwargs,
                       limits)
        out = fn(*args, **kwargs)
        if isinstance(out, (str, list, tuple, dict)):
            measure(out, limits.output_chars)
        return out

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, op, left, right):
            _check_binop(op, left, right, limits)
            return super().call_binop(context, op, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
            target = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
            owner = getattr(target, "__self__", None)
            values = ((owner,) if isinstance(owner, str) else (None,)) + args  # a str method: its string first
            return checked(getattr(target, "__name__", "a call"),
                           lambda *a, **k: super(Env, __self).call(__context, __obj, *a, **k), args, kwargs,
                           values) if target is not safe_range else super().call(__context, __obj, *args, **kwargs)

        def bounded_iter(self, iterable):
            budget = _BUDGET.get()
            for x in iterable:
                if budget is not None:
                    budget.tick()
                yield x

        def bounded_concat(self, *parts):
            for p in parts:
                measure(p, limits.output_chars)
            out = "".join(map(str, parts))
            if len(out) > limits.output_chars:
                raise _too_big("a string (~)", len(out), limits.output_chars)
            return out

    def bound_filter(name: str, fn):
        from functools import wraps

        from jinja2.utils import _PassArg

        internal = _PassArg.from_obj(fn) is not None  # its first argument is Jinja's environment or context

        @wraps(fn)
        def bounded(*args, **kwargs):
            return checked(f"the {name} filter", fn, args, kwargs, args[1:] if internal else args)
        return bounded

    return Env, bound_filter


def _check_binop(op: str, left, right, limits: TemplateLimits) -> None:
    """Refuse ``left op right`` when its result would pass the limits (sizes computed, not the result)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    seqs = (str, list, tuple)
    cap = limits.output_chars
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, seqs) and is_int(n) and len(seq) * n > cap:
                raise _too_big(f"a {type(seq).__name__} ({len(seq):,} x {n:,})", len(seq) * n, cap)
        if is_int(left) and is_int(right) and left.bit_length() + right.bit_length() > limits.int_bits:
            raise _too_big("an integer (bits)", left.bit_length() + right.bit_length(), limits.int_bits)
    elif op == "**" and is_int(left) and is_int(right) and abs(left) > 1 and right > 0:
        bits = right * left.bit_length()
        if bits > limits.int_bits:
            raise _too_big(f"an integer ({left} ** {right:,}, bits)", bits, limits.int_bits)
    elif op == "+" and isinstance(left, seqs) and isinstance(right, seqs):
        if len(left) + len(right) > cap:
            raise _too_big(f"a {type(left).__name__} (+)", len(left) + len(right), cap)
    elif op == "%" and isinstance(left, str):
        _percent_size(left, right, limits)


def check_constants(ast, limits: TemplateLimits) -> None:
    """Refuse, at load, a template whose constant expressions or constant loops break ``limits``: the
    ``'a' * 10**10`` that compile-time folding would build, ``10**10**10``, ``range(100000)`` nested in
    ``range(100000)``. Raises TemplateBudgetError naming the line."""
    from jinja2 import nodes

    def const(node):
        """The value of a constant expression, computed only when within the limits (else raises); None
        when not constant."""
        if isinstance(node, nodes.Const):
            return node.value
        if isinstance(node, (nodes.List, nodes.Tuple)):
            items = [const(x) for x in node.items]
            return None if any(i is None for i in items) else items
        ops = {nodes.Mul: "*", nodes.Pow: "**", nodes.Add: "+", nodes.Mod: "%"}
        if type(node) in ops:
            left, right = const(node.left), const(node.right)
            if left is None or right is None:
                return None
            try:
                _check_binop(ops[type(node)], left, right, limits)
            except TemplateBudgetError as e:
                raise TemplateBudgetError(f"line {node.lineno}: {e}") from None
            try:
                return FOLD[ops[type(node)]](left, right)
            except Exception:
                return None
        return None

    def trips(loop) -> int | None:
        it = loop.iter
        if isinstance(it, nodes.Call) and isinstance(it.node, nodes.Name) and it.node.name == "range":
            args = [const(a) for a in it.args]
            if it.args and len(args) <= 3 and all(isinstance(a, int) for a in args) and args[-1:] != [0]:
                return None if it.kwargs else len(range(*args))
        value = const(it)
        return len(value) if isinstance(value, (list, str)) else None

    def walk(node, outer: int) -> None:
        if isinstance(node, nodes.Expr):
            const(node)
        here = outer
        if isinstance(node, nodes.For):
            n = trips(node)
            if n is not None:
                here = outer * n
                if here > limits.loop_iterations:
                    raise TemplateBudgetError(f"line {node.lineno}: chat template loops nest to {here:,} iterations "
                                              f"(the limit is {limits.loop_iterations:,})")
        for child in node.iter_child_nodes():
            walk(child, here if isinstance(node, nodes.For) and child in node.body else outer)

    walk(ast, 1)


@lru_cache(maxsize=16)
def compile_template(source: str, limits: TemplateLimits = TemplateLimits()):
    """Jinja as transformers sets it up: sandboxed, trim_blocks + lstrip_blocks, loop controls, a
    tojson that does not escape HTML, raise_exception and strftime_now; bounded by ``limits`` (``_bounded_env``)."""
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def finalize(value):
        if not isinstance(value, str):
            measure(value, limits.output_chars)  # what str() would print, before it prints it
        return value

    env_class, bound_filter = _bounded_env(limits)
    env = env_class(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], finalize=finalize)
    env.filters["tojson"] = tojson
    env.filters = {name: bound_filter(name, fn) for name, fn in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals.pop("lipsum", None)  # paragraphs of filler text: nothing a chat template needs

    class Bound(NodeTransformer):  # every loop counts its iterations; every ~ measures what it joins
        def visit_For(self, node):
            self.generic_visit(node)
            node.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [node.iter], [], None, None,
                                   lineno=node.lineno)
            return node

        def visit_Concat(self, node):
            self.generic_visit(node)
            return nodes.Call(nodes.EnvironmentAttribute("bounded_concat"), node.nodes, [], None, None,
                              lineno=node.lineno)

    try:
        ast = env.parse(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
    try:
        check_constants(ast, limits)
    except TemplateBudgetError as e:
        raise TemplateBudgetError(f"chat template refused at load: {e}") from None
    ast = Bound().visit(ast)
    return env.template_class.from_code(env, env.compile(ast), env.make_globals(None), None)


def render(source: str, limits: TemplateLimits, **context) -> str:
    """``source`` rendered with ``context`` within ``limits``: a TemplateBudgetError past them (Jinja's own
    errors pass through). Pieces are counted as they come out, so an output bomb stops at the cap, not after it."""
    budget = _Budget(limits)
    token = _BUDGET.set(budget)
    try:
        out = []
        for piece in compile_template(source, limits).generate(**context):
            budget.emit(piece)
            out.append(piece)
        return "".join(out)
    finally:
        _BUDGET.reset(token)
