"""One bounded YAML loader for every file people write: rule files, sinks.yaml, the config file.

PyYAML's SafeLoader is safe from code execution but not from hostile *shape*: an alias bomb
(9 levels of 9 aliases in 0.7 KB expand to 387 million nodes), 20,000-deep nesting (a
RecursionError in the composer and in every recursive walk after it), a non-UTF-8 byte (a
UnicodeDecodeError that escapes `except yaml.YAMLError`). `load_file` bounds all of them:

- the file is read as bytes (at most `MAX_BYTES`) and decoded as UTF-8; a bad byte is an error
  naming its line;
- nesting deeper than `MAX_DEPTH` collections is refused while composing (before any recursion
  can run away), so every later tree walk is bounded too;
- aliases are allowed (anchors are handy for shared sink lists), but the *expanded* document may
  hold at most `MAX_NODES` nodes: each alias counts the full size of what it points to, computed
  once per anchor, so a bomb is refused in linear time before anything is constructed.

Every problem is a `YamlFileError` carrying file, line and a one-line message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.nodes import MappingNode, Node, SequenceNode

MAX_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 200_000


class YamlFileError(ValueError):
    """A file that cannot be read or parsed within bounds; `line` is 1-based (0: unknown)."""

    def __init__(self, file: str, line: int, message: str) -> None:
        self.file = file
        self.line = line
        self.message = message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {message}")


class BoundedSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting while composing and oversized alias expansion."""

    max_depth = MAX_DEPTH
    max_nodes = MAX_NODES

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > self.max_depth and not self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ComposerError(
                    None,
                    None,
                    f"nested deeper than {self.max_depth} levels (refused)",
                    event.start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        if node is not None:
            check_expansion(node, self.max_nodes)
        return node


def check_expansion(root: Node, limit: int = MAX_NODES) -> int:
    """Nodes of the document with every alias expanded; ComposerError past `limit`.

    Iterative post-order over the node graph (aliases share node objects), memoised per node:
    linear in the size of the file whatever the aliases multiply to.
    """
    sizes: dict[int, int] = {}
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in sizes and not done:
            continue
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        if not done:
            sizes[key] = -1  # in progress
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        total = 1 + sum(max(0, sizes.get(id(c), 0)) for c in children)
        if total > limit:
            raise ComposerError(
                None,
                None,
                f"expands to more than {limit:,} nodes (alias bomb?); refused",
                node.start_mark,
            )
        sizes[key] = total
    return max(0, sizes.get(id(root), 0))


def decode_utf8(data: bytes, file: str) -> str:
    """`data` as text; a non-UTF-8 byte is a YamlFileError naming its line and byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start : exc.start + 1].hex()
        raise YamlFileError(file, line, f"not UTF-8 text (byte 0x{bad})") from None


def read_text(path: Path, file: str | None = None, max_bytes: int = MAX_BYTES) -> str:
    """The file's text: bounded size, UTF-8, every failure a YamlFileError naming the file."""
    shown = file or str(path)
    try:
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise YamlFileError(shown, 0, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise YamlFileError(shown, 0, f"larger than {max_bytes:,} bytes (refused)")
    return decode_utf8(data, shown)


def loads(
    text: str, file: str = "<string>", loader: type[BoundedSafeLoader] = BoundedSafeLoader
) -> Any:
    """Parse YAML text with `loader` (bounded); errors are YamlFileError with file and line."""
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 0
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise YamlFileError(file, line, f"invalid YAML: {problem}") from None
    except RecursionError:  # a tree shape the bounds above did not catch: still one error
        raise YamlFileError(file, 0, "invalid YAML: nested too deeply") from None


def load_file(
    path: str | Path,
    file: str | None = None,
    loader: type[BoundedSafeLoader] = BoundedSafeLoader,
    max_bytes: int = MAX_BYTES,
) -> Any:
    """Read and parse one YAML file within bounds (see the module doc)."""
    p = Path(path)
    shown = file or str(p)
    return loads(read_text(p, shown, max_bytes), shown, loader)
