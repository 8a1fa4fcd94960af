"""A request body decoded from JSON, or a RequestError that says what is wrong with it.

The body is read by pydantic's JSON parser, which refuses what Python's would pass on to
fail deeper as a 500: nesting deep enough to exhaust the recursion limit, and a lone UTF-16
surrogate escape ("\\ud800" with no low half after it, or a low half alone). JSON's grammar
spells one, but it is no character: it cannot be written as UTF-8, and no tokenizer takes
it (tokenizers' encode raises TypeError); replacing it would change the client's text
unseen, so it is refused. pydantic calls it "unexpected end of hex escape" or "lone
leading surrogate in hex escape", at a column past the escape, which does not tell a
client what to fix; the refusal here names the escape, the field that holds it and where
it starts.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic_core import from_json

from shardline.entrypoints.protocol import RequestError

# A JSON string literal (outside strings a body has no quotes), and an escape inside one.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)
_SURROGATE = re.compile("[\ud800-\udfff]")


def decode_body(body: bytes) -> Any:
    """`body` decoded from JSON, or a RequestError saying why it cannot be."""
    try:
        return from_json(body)
    except ValueError as exc:
        if "hex escape" in str(exc):   # pydantic's words for a lone surrogate escape
            _refuse_lone_surrogate(body)
        raise RequestError(f"the body is not valid JSON: {exc}", None) from None


def _refuse_lone_surrogate(body: bytes) -> None:
    """Raise the RequestError naming the body's first lone surrogate escape, if it has one
    (pydantic read the body up to it, so string literals before it are found correctly)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return
    start = _lone_surrogate_escape(text)
    if start is None:
        return
    line = text.count("\n", 0, start) + 1
    column = start - text.rfind("\n", 0, start)
    path = _surrogate_path(text)
    where = f"in {path} " if path else ""
    raise RequestError(
        f"the body holds an unpaired UTF-16 surrogate escape, {text[start:start + 6]}, "
        f"{where}(line {line}, column {column}): it spells no character (a surrogate escape "
        "is half of a pair, as \\ud83d\\ude00 is one character), so it is no text a model "
        "takes; send the character itself in UTF-8, or as its pair of escapes", path)


def _lone_surrogate_escape(text: str) -> int | None:
    """The offset in `text` (JSON) of its first surrogate escape that is not half of a
    high-low pair, or None."""
    for string in _STRING.finditer(text):
        high = None   # the offset of a high surrogate escape waiting for its low half
        high_end = -1
        for escape in _ESCAPE.finditer(text, string.start() + 1, string.end() - 1):
            if high is not None and escape.start() != high_end:
                return high   # text came between the high half and this escape
            code = int(escape.group(1), 16) if escape.group(1) else None
            if code is not None and 0xDC00 <= code <= 0xDFFF:
                if high is None:
                    return escape.start()
                high = None
            elif high is not None:
                return high
            elif code is not None and 0xD800 <= code <= 0xDBFF:
                high, high_end = escape.start(), escape.end()
        if high is not None:
            return high
    return None


def _surrogate_path(text: str) -> str | None:
    """Where the first string holding a surrogate is in the body, as the server names
    fields ("messages.0.content"; a key's path for a key), or None when it is the body
    itself or Python's decoder cannot read the body either."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    pending: list[tuple[tuple, Any]] = [((), value)]   # a stack, in document order
    while pending:
        path, item = pending.pop()
        if isinstance(item, str) and _SURROGATE.search(item):
            return ".".join(_printable(part) for part in path) or None
        if isinstance(item, dict):
            for key, inner in reversed(item.items()):
                pending += [((*path, key), inner), ((*path, key), key)]
        elif isinstance(item, list):
            pending.extend(((*path, i), inner) for i, inner in reversed(list(enumerate(item))))
    return None


def _printable(part: object) -> str:
    """A path part as UTF-8 can carry it: a key's lone surrogate as its escape."""
    return str(part).encode("utf-8", "backslashreplace").decode("utf-8")
