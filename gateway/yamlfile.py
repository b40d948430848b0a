"""YAML read within bounds: every YAML file a process of ours reads (the gateway's config and
cluster files, the replica's config and timing profiles, the benchmark's profile) goes through
`load_yaml`, so an alias bomb or a deeply nested file is refused in milliseconds, and an error
quotes a short problem and where it is, never the file (which may hold credentials).

Small and free of the rest of the gateway (only its errors), so the replica imports it too."""

from __future__ import annotations

from typing import Any

import yaml

from gateway.errors import ConfigError

MAX_PROBLEM_CHARS = 80  # of the parser's problem an error quotes
MAX_ALIAS_NODES = 10_000  # values that aliases (*name) may add to a file, all uses together
MAX_DEPTH = 64  # nested lists and mappings; our configs need six at most


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader that measures as it composes what each alias stands for: nine lists of nine
    aliases, nested eight deep, are 358 bytes and 43 million values that validation and error
    messages would walk (19 s, 360 MB). Each use of an alias adds its node's expanded size;
    past MAX_ALIAS_NODES in all, or nested past MAX_DEPTH (the composer recurses), the file
    is refused at the alias or bracket that crossed the line."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth)
        self._aliased = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # check_event has parsed the next event into current_event: the alias, or the node's
        # first event (where a refusal points).
        if self.check_event(yaml.AliasEvent):
            self._count_alias(self.current_event)
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                self._refuse(f"lists and mappings nested deeper than {MAX_DEPTH}")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is not None:
            self._measured[id(node)] = self._measure(node)
        return node

    def _measure(self, node: yaml.Node) -> tuple[int, int]:
        if isinstance(node, yaml.SequenceNode):
            children = [self._measured[id(child)] for child in node.value]
        elif isinstance(node, yaml.MappingNode):
            children = [self._measured[id(n)] for pair in node.value for n in pair]
        else:
            return 1, 1
        return 1 + sum(n for n, _ in children), 1 + max((d for _, d in children), default=0)

    def _count_alias(self, event: yaml.AliasEvent) -> None:
        node = self.anchors.get(event.anchor)
        if node is None:
            return  # undefined: the composer says so
        if id(node) not in self._measured:
            self._refuse(f"alias *{event.anchor} is used inside its own anchor")
        values, depth = self._measured[id(node)]
        self._aliased += values
        if self._aliased > MAX_ALIAS_NODES:
            self._refuse(f"aliases expand to more than {MAX_ALIAS_NODES} values")
        if self._depth + depth > MAX_DEPTH:
            self._refuse(f"alias *{event.anchor} nests values deeper than {MAX_DEPTH}")

    def _refuse(self, problem: str) -> None:
        raise yaml.composer.ComposerError(None, None, problem, self.current_event.start_mark)


def load_yaml(text: str) -> Any:
    """A YAML document as plain data, its aliases and nesting bounded (BoundedLoader)."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__  # str(exc) quotes the file
        raise ConfigError(f"(yaml) {where}{_clip(problem)}") from None
    finally:
        loader.dispose()


def _clip(text: str) -> str:
    return text if len(text) <= MAX_PROBLEM_CHARS else text[:MAX_PROBLEM_CHARS] + "..."
