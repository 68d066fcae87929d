"""Read multi-document YAML and remember the line of every value.

PyYAML's composer gives nodes with marks; we build plain Python values from them
ourselves and keep a map from each value's path to its line, so validation
errors can name the line the user has to edit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

try:  # the C composer is ~5x faster on large policy sets; fall back quietly
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml missing
    _Loader = yaml.SafeLoader

Path = tuple[str | int, ...]


@dataclass
class Document:
    index: int  # 1-based
    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    start_line: int = 1

    def line_of(self, path: Path) -> int | None:
        """The line of the deepest known ancestor of `path`."""
        p = tuple(path)
        while True:
            if p in self.lines:
                return self.lines[p]
            if not p:
                return self.start_line
            p = p[:-1]


class YAMLSyntaxError(Exception):
    def __init__(self, document: int, line: int | None, message: str) -> None:
        super().__init__(message)
        self.document = document
        self.line = line
        self.message = message


def _construct(node: yaml.Node, path: Path, lines: dict[Path, int], constructor: Any) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        constructor.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = constructor.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                key = str(key)
            if key in out:
                raise YAMLSyntaxError(0, key_node.start_mark.line + 1, f"duplicate key {key!r}")
            out[key] = _construct(value_node, (*path, key), lines, constructor)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, (*path, i), lines, constructor) for i, v in enumerate(node.value)]
    return constructor.construct_object(node, deep=True)


def load_documents(text: str) -> Iterator[Document]:
    """Yield every non-empty document in `text`, numbered as a user counts them."""
    loader = _Loader(text)
    index = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            index += 1
            if node is None:
                continue
            lines: dict[Path, int] = {}
            try:
                data = _construct(node, (), lines, loader)
            except YAMLSyntaxError as e:
                raise YAMLSyntaxError(index, e.line, e.message) from None
            if data is None:
                continue
            yield Document(index=index, data=data, lines=lines, start_line=node.start_mark.line + 1)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark is not None else None
        raise YAMLSyntaxError(max(index, 1), line, f"{e.problem or e.context}") from None
    except yaml.reader.ReaderError as e:  # a control character or bad encoding: not a MarkedYAMLError
        line = text.count("\n", 0, e.position) + 1 if isinstance(e.position, int) else None
        raise YAMLSyntaxError(max(index, 1), line, f"unacceptable character #x{e.character:04x}: {e.reason}") from None
    except yaml.YAMLError as e:  # anything else PyYAML raises is still the file's fault
        raise YAMLSyntaxError(max(index, 1), None, str(e)) from None
    finally:
        loader.dispose()
