"""Reads a deploy file's YAML within bounds, and cuts values down before an error line shows them.

A deploy file may come from someone else. yaml.safe_load runs no code, but it accepts aliases: a few hundred
bytes of nested ``&a [*b, *b, ...]`` describe billions of values, and whatever walks them afterwards
(validation, an error message that prints the value) runs out of memory or time. Deeply nested brackets
make PyYAML's composer recurse until Python's stack gives out. So the loader here refuses, at the first
event past a bound and before building anything large:
- text longer than MAX_CHARS (deploy files are a few kilobytes);
- nesting deeper than MAX_DEPTH;
- more than MAX_VALUES values counted with every alias expanded (anchors and merge keys that a deploy
  file really uses stay far below).
Python's own bounds (an integer of more than 4,300 digits) become the same kind of error. Each refusal is
a yaml.YAMLError, with the line and column where it happened when there is one, like a syntax error.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.resolver import Resolver

try:  # libyaml's parser: the same events as PyYAML's own, many times faster
    from yaml._yaml import CParser as _Parser
except ImportError:  # PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream):
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


MAX_CHARS = 256 * 1024
MAX_DEPTH = 64
MAX_VALUES = 10_000
EXCERPT = 80
"""Most characters of a value that an error line shows."""


class _BoundedLoader(Composer, _Parser, SafeConstructor, Resolver):
    """yaml.CSafeLoader's parts, with PyYAML's composer (which can count) in place of libyaml's."""

    def __init__(self, text: str):
        _Parser.__init__(self, text)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._depth = 0
        self._values = 0
        self._size: dict[str, int] = {}  # anchor -> values it stands for, aliases inside it expanded

    def _refuse(self, problem: str, event) -> None:
        raise ComposerError(None, None, problem, event.start_mark)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            self._values += self._size.get(event.anchor, 0)  # an unknown anchor is PyYAML's own error
            if self._values > MAX_VALUES:
                self._refuse(
                    f"aliases expand to more than {MAX_VALUES:,} values (expected a deploy file without alias bombs)",
                    event,
                )
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            self._refuse(f"nested deeper than {MAX_DEPTH} levels", event)
        before = self._values
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._values += 1
        if self._values > MAX_VALUES:
            self._refuse(f"more than {MAX_VALUES:,} values (expected a deploy file of a few kilobytes)", event)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._size[anchor] = self._values - before
        return node


def load(text: str) -> Any:
    """yaml.safe_load within the bounds above; raises yaml.YAMLError past them."""
    if len(text) > MAX_CHARS:
        raise yaml.YAMLError(f"longer than {MAX_CHARS:,} characters (expected a deploy file of a few kilobytes)")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except ValueError as exc:  # Python's own bound, e.g. an integer of more than 4,300 digits
        raise yaml.YAMLError(str(exc).splitlines()[0][:200]) from None
    finally:
        loader.dispose()


def excerpt(value: Any, limit: int = EXCERPT) -> str:
    """``repr(value)`` cut to ``limit`` characters with an ellipsis; a container is only counted, never walked
    (an alias graph may stand for billions of values)."""
    if isinstance(value, (dict, list, tuple, set)):
        return f"a {type(value).__name__} of {len(value)} item{'s' if len(value) != 1 else ''}"
    shown = repr(value[: limit + 1] if isinstance(value, (str, bytes)) else value)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def shorten(message: str, limit: int = 400) -> str:
    """An error message whose every long word (a value a validator quoted) is cut to an excerpt, and which is
    itself cut to ``limit`` characters: one short line whatever the input."""
    words = [w if len(w) <= EXCERPT else w[: EXCERPT - 1] + "…" for w in message.replace("\n", "\\n").split(" ")]
    line = " ".join(words)
    return line if len(line) <= limit else line[: limit - 1] + "…"
