"""YAML from untrusted places (recipes, command-line overrides, a downloaded checkpoint's
config.yaml): safe tags only, bounded size, no alias bombs, errors with line and column.

`yaml.safe_load` already refuses Python tags, but it expands aliases: a few hundred bytes of
`&a [*a, *a, ...]` nested ten deep describe billions of nodes, and whatever walks the result
(our validation, `yaml.safe_dump` of the resolved recipe, `dataclasses.asdict`) then takes the
machine down. Here the document is composed first (the node graph, where an alias is one
pointer) and its expanded size counted with memoisation, so a bomb is refused in
microseconds, before anything is constructed. Recursive aliases are refused too.
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a recipe is a few KiB; 1 MiB is far beyond any real one
MAX_NODES = 100_000  # nodes after expanding aliases (a full recipe has ~100)

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 240, 120, 6, 6, 2


def short(value: Any) -> str:
    """repr() of a value, bounded: error messages never echo an unbounded value."""
    return _short.repr(value)


class YamlError(ValueError):
    """A document that is not valid YAML or is refused; the message has no source prefix."""


def _expanded_size(node: yaml.Node, memo: dict, stack: set) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    if key in stack:
        raise YamlError("recursive alias (an anchor used inside itself)")
    stack.add(key)
    if isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_expanded_size(c, memo, stack) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n = 1 + sum(_expanded_size(k, memo, stack) + _expanded_size(v, memo, stack) for k, v in node.value)
    else:
        n = 1
    stack.discard(key)
    memo[key] = n
    if n > MAX_NODES:
        raise YamlError(f"refused: more than {MAX_NODES} nodes once aliases are expanded (an alias bomb?)")
    return n


def _where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if mark is None:
        return f"not valid YAML: {problem}"
    return f"line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {problem}"


def load(text: str | bytes) -> Any:
    """Parse one YAML document safely; YamlError (one line, with line and column) if refused."""
    if len(text) > MAX_BYTES:
        raise YamlError(f"refused: {len(text)} bytes, more than the {MAX_BYTES} a YAML file here may hold")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise YamlError(_where(e)) from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise YamlError(f"refused: {str(e)[:120]}") from None
    except RecursionError:
        raise YamlError("refused: nested too deeply") from None
    finally:
        loader.dispose()


def load_file(path) -> Any:
    """`load` of a file, refused by its size before it is read."""
    from pathlib import Path

    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise YamlError(f"refused: {size} bytes, more than the {MAX_BYTES} a YAML file here may hold")
    return load(path.read_bytes())
