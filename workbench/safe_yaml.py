"""The one way a study's YAML (or JSON) text is read: bounded in bytes, values, depth and alias expansion.

PyYAML resolves an alias `*a` to the very node anchored `&a`, so nine nested lists of nine `*a` each
(under 600 bytes) describe 9**9 values; anything that walks the loaded value (str(), freezing it for
a cache key, writing it to JSON) then expands them all and never finishes. `StudyLoader` counts the
values a document stands for, aliases expanded, and refuses it past MAX_VALUES before anything walks it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .errors import StudyError

MAX_STUDY_BYTES = 1 << 20  # a preset of a thousand prompts is ~100 KB
MAX_MANIFEST_BYTES = 10 << 20  # a manifest.json adds run records and metric definitions to its study
MAX_VALUES = 10_000  # scalars, lists and mappings, aliases expanded; a shipped preset has ~100
MAX_DEPTH = 32  # nesting of lists and mappings; a preset needs 5 (methods > block_scales > up > block > list)


class _Refused(Exception):
    """Why a document is refused; `load_yaml` turns it into a StudyError naming the source."""


class StudyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses documents of more than MAX_VALUES values (aliases expanded), nesting
    deeper than MAX_DEPTH, or an alias inside the node it names."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._composed = 0

    def compose_node(self, parent, index):
        # Count while composing, so a long plain list is refused before it is all read.
        self._depth += 1
        self._composed += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels")
            if self._composed > MAX_VALUES:
                raise _Refused(f"more than {MAX_VALUES} values; a study needs far fewer")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node, 1, {}, set())
        return node


def _expanded_size(node, depth: int, sizes: dict, open_nodes: set) -> tuple[int, int]:
    """(values, height) of `node` with every alias expanded; each distinct node is visited once."""
    key = id(node)
    if key in open_nodes:
        raise _Refused("an alias refers to a node that contains it")
    if key not in sizes:
        if depth > MAX_DEPTH:
            raise _Refused(f"aliases expand to lists or mappings nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        open_nodes.add(key)
        size, height = 1, 0
        for child in children:
            child_size, child_height = _expanded_size(child, depth + 1, sizes, open_nodes)
            size, height = size + child_size, max(height, child_height)
            if size > MAX_VALUES:
                raise _Refused(f"aliases (*name) expand to more than {MAX_VALUES} values; write the values out")
        open_nodes.discard(key)
        sizes[key] = (size, height + 1)
    size, height = sizes[key]
    if depth + height - 1 > MAX_DEPTH:
        raise _Refused(f"aliases expand to lists or mappings nested deeper than {MAX_DEPTH} levels")
    return sizes[key]


def load_yaml(text: str | bytes, source: str):
    """Parse study YAML text safely (see module docstring). Raises StudyError('SOURCE: what is wrong')."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_STUDY_BYTES:
        raise StudyError(f"{source}: {size / 2**20:.1f} MB, more than the {MAX_STUDY_BYTES >> 20} MB a study "
                         "may have; a study needs only kilobytes")
    try:
        return yaml.load(text, Loader=StudyLoader)
    except _Refused as error:
        raise StudyError(f"{source}: refused: {error}") from None
    except yaml.YAMLError as error:
        raise StudyError(f"{source}: not valid YAML ({str(error).splitlines()[0]})") from None


def read_study_file(path: str | Path, source: str | None = None, *, max_bytes: int = MAX_STUDY_BYTES):
    """The value in a .yaml/.yml (via load_yaml) or .json file, refused unread past `max_bytes`."""
    path = Path(path)
    source = source or str(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise StudyError(f"{source}: {size / 2**20:.1f} MB, more than the {max_bytes / 2**20:g} MB a study may "
                         "have; a study needs only kilobytes")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise StudyError(f"{source}: not UTF-8 text") from None
    if path.suffix.lower() != ".json":
        return load_yaml(text, source)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise StudyError(f"{source}: not valid JSON ({error})") from None
    except RecursionError:
        raise StudyError(f"{source}: refused: nested too deeply") from None
