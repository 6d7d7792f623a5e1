"""A YAML reader with bounded memory: aliases may not expand a spec beyond a small size.

PyYAML shares the node an alias points at, so ``yaml.safe_load`` itself stays small on a
"billion laughs" document (nine levels of nine aliases, a few hundred bytes); everything
that walks the result afterwards (validation, error messages, ``yaml.dump``) expands it to
billions of nodes. The document is composed once, its expanded size computed on the
shared graph (memoized, so the count is cheap), and refused before anything walks it.
"""

from __future__ import annotations

from typing import Any

import yaml

# A full spec is a few hundred nodes; a generous bound still stops expansion early.
MAX_EXPANDED_NODES = 10_000


class YamlTooLarge(ValueError):
    """The document expands (through aliases or sheer size) beyond MAX_EXPANDED_NODES."""


def expanded_size(root: yaml.Node, limit: int = MAX_EXPANDED_NODES) -> int:
    """Nodes the document has once every alias is expanded (stops counting past limit)."""
    memo: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in memo:
            return memo[key]
        memo[key] = limit + 1  # a cycle (recursive alias) counts as unbounded
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                if total > limit:
                    break
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += size(k) + size(v)
                if total > limit:
                    break
        memo[key] = min(total, limit + 1)
        return memo[key]

    return size(root)


def compose_bounded(text: str) -> yaml.Node | None:
    """Compose ``text`` into a node graph; raise YamlTooLarge if it expands past the bound.

    yaml.YAMLError propagates for syntax errors (with its line)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except RecursionError:
        raise YamlTooLarge("nested too deeply") from None
    finally:
        loader.dispose()
    if node is not None and expanded_size(node) > MAX_EXPANDED_NODES:
        raise YamlTooLarge(f"expands to more than {MAX_EXPANDED_NODES} values through "
                           "aliases (&/*) or size; a spec has a few hundred")
    return node


def construct(node: yaml.Node | None) -> Any:
    """The Python value of a composed (and bounded) document."""
    if node is None:
        return None
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()
