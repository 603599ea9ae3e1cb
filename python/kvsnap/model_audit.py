"""What a model's attention code does with the keys and values its cache returns.

mlx-lm's ``KVCache.update_and_fetch`` returns the whole history of keys and
values; kvsnap's cache returns only the new tokens' (its attention reads the
history from the arena blocks). A model is served correctly when its
attention passes what ``update_and_fetch`` returned to
``scaled_dot_product_attention`` and uses it for nothing else: not its shape,
not a concatenation, not a second attention. ``make_cache`` checks that by
reading the source of the model's attention classes: in the code that can run
after the ``update_and_fetch`` call, every use of the names its result is
bound to must be an argument of the attention call.

The families kvsnap claims, as of mlx-lm 0.32.2: llama (also mistral),
qwen2, qwen3 and gemma3_text each bind ``keys, values =
cache.update_and_fetch(keys, values)`` and pass both to
``scaled_dot_product_attention``, nothing else. (qwen2's pipeline-parallel
path reads ``cache[-1].keys``, which kvsnap caches do not have; kvsnap serves
models on one device.)
"""

from __future__ import annotations

import ast
import inspect
import textwrap

from kvsnap.errors import UnsupportedModelError

ATTENTION_CALL = "scaled_dot_product_attention"

_verdicts: dict[type, str | None] = {}  # attention class -> problem (reading source takes ms)


def check_history_unused(model, attention_modules) -> None:
    """Raise UnsupportedModelError if an attention module's code needs the
    whole K/V history from ``update_and_fetch`` (see the module doc)."""
    for cls in dict.fromkeys(type(m) for m in attention_modules):
        if cls not in _verdicts:
            _verdicts[cls] = history_use(cls)
        if _verdicts[cls] is not None:
            model_type = getattr(getattr(model, "args", None), "model_type", None) or type(model).__module__
            raise UnsupportedModelError(f"{model_type}: {_verdicts[cls]}")


def history_use(cls: type) -> str | None:
    """Why the code of ``cls`` may need more than the new keys/values from
    ``update_and_fetch``, or None when it only hands them to the attention call.
    Reads the class that defines ``cls.__call__`` (a subclass may inherit it)."""
    cls = next((k for k in cls.__mro__ if "__call__" in vars(k)), cls)
    try:
        lines, first_line = inspect.getsourcelines(cls)
        path = inspect.getsourcefile(cls) or "?"
    except (OSError, TypeError):
        return (
            f"kvsnap cannot read the source of {cls.__qualname__} to check what it does with "
            "the keys and values cache.update_and_fetch returns"
        )
    source = textwrap.dedent("".join(lines))
    tree = ast.parse(source)
    found = False
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        parents = {child: node for node in ast.walk(fn) for child in ast.iter_child_nodes(node)}
        for call in ast.walk(fn):
            if not (isinstance(call, ast.Call) and _name(call.func) == "update_and_fetch"):
                continue
            found = True
            bad = _misuse(call, parents, fn)
            if bad is not None:
                line = source.splitlines()[bad.lineno - 1].strip()
                return (
                    f"{cls.__qualname__} ({path}:{first_line + bad.lineno - 1}) uses the keys/values "
                    f"cache.update_and_fetch returns for more than the attention call: `{line}`. "
                    "It needs the whole K/V history there (mlx-lm's KVCache returns it); kvsnap's "
                    "cache returns only the new tokens' keys and values"
                )
    if not found:
        return (
            f"{cls.__qualname__} does not call cache.update_and_fetch itself, so kvsnap cannot "
            "check that the model needs only the new keys and values it returns"
        )
    return None


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _misuse(call: ast.Call, parents: dict, fn: ast.AST) -> ast.AST | None:
    """The first node using the result of ``call`` for more than the attention
    call, or None."""
    parent = parents[call]
    if isinstance(parent, ast.Starred) and _is_attention_arg(parent, parents):
        return None  # scaled_dot_product_attention(q, *cache.update_and_fetch(k, v), ...)
    if not isinstance(parent, ast.Assign) or parent.value is not call:
        return call
    names = {n.id for t in parent.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    if any(not isinstance(n, (ast.Name, ast.Tuple, ast.List, ast.Load, ast.Store))
           for t in parent.targets for n in ast.walk(t)):
        return parent  # bound to attributes or items: followed no further
    for stmt in _runs_after(parent, parents, fn):
        for node in ast.walk(stmt):
            if (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in names
                    and not _is_attention_arg(node, parents)):
                return node
        if isinstance(stmt, ast.Assign):  # rebound: later uses are of another value
            names -= {t.id for t in stmt.targets if isinstance(t, ast.Name)}
    return None


def _is_attention_arg(node: ast.AST, parents: dict) -> bool:
    parent = parents.get(node)
    if isinstance(parent, ast.keyword):
        parent = parents.get(parent)
    # Only the module-level name: route_attention rebinds it (mx.fast's is not routed).
    return (isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name)
            and parent.func.id == ATTENTION_CALL)


def _runs_after(stmt: ast.stmt, parents: dict, fn: ast.AST) -> list[ast.stmt]:
    """The statements of ``fn`` that can run after ``stmt``, in order (the
    other branch of an ``if`` that holds it excluded; a loop's body included)."""
    out: list[ast.stmt] = []
    node = stmt
    while node is not fn:
        parent = parents[node]
        for field in ("body", "orelse", "handlers", "finalbody"):
            block = getattr(parent, field, None)
            if isinstance(block, list) and any(x is node for x in block):
                i = next(k for k, x in enumerate(block) if x is node)
                loops = (ast.For, ast.AsyncFor, ast.While)
                again = block[:i] if isinstance(parent, loops) and field == "body" else []
                out += block[i + 1 :] + again
                break
        node = parent
    return out
