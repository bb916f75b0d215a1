"""YAML loading that refuses duplicate keys and remembers where every value came from.

PyYAML silently keeps the last of two equal keys; an inventory with `memory_mib` twice
would then mean something nobody wrote. Building the Python value from the composed node
tree lets us refuse that and record the line of every path for error messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]


@dataclass
class YamlProblem(Exception):
    """The document could not be read as data: a syntax error or a duplicate key."""

    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}, column {self.column}: " if self.line is not None else ""
        return where + self.message


@dataclass
class Located:
    """A loaded YAML document and the 1-based line of each path in it."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)

    def line_of(self, path: Path) -> int | None:
        """The line of path, or of its closest ancestor that has one."""
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]


def load(text: str) -> Located:
    """Parse one YAML document (safe tags only) into plain data plus line numbers."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        raise YamlProblem(problem, mark.line + 1 if mark else None, mark.column + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(str(exc)) from None
    except RecursionError:
        raise YamlProblem("the document nests too deeply") from None
    located = Located(None)
    if node is None:
        return located
    try:
        located.data = _build(node, (), located.lines, frozenset())
    except RecursionError:
        raise YamlProblem("the document nests too deeply") from None
    return located


_constructor = yaml.SafeLoader(stream="")


def _build(node: yaml.Node, path: Path, lines: dict[Path, int], ancestors: frozenset[int]) -> Any:
    lines[path] = node.start_mark.line + 1
    if id(node) in ancestors:
        raise YamlProblem("an alias refers to a node that contains it", node.start_mark.line + 1,
                          node.start_mark.column + 1)
    ancestors = ancestors | {id(node)}
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlProblem("merge keys (<<) are not supported in the inventory",
                                  key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlProblem("a mapping key must be a plain value, not a list or mapping",
                                  key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            key = _build(key_node, (*path, "<key>"), {}, ancestors)
            if key in out:
                raise YamlProblem(f"duplicate key {key!r} (first on line {lines[(*path, key)]})",
                                  key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _build(value_node, (*path, key), lines, ancestors)
            lines[(*path, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), lines, ancestors) for i, item in enumerate(node.value)]
    try:
        return _constructor.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        raise YamlProblem(exc.problem or "cannot read value", mark.line + 1 if mark else None,
                          mark.column + 1 if mark else None) from None
