# Names from a snapshot are data: shown on a terminal, they are quoted the way GNU ls quotes them
# there (its default "shell-escape" style), so a newline or an escape sequence in a name never
# reaches the terminal raw, and what is printed can be pasted back into a shell.
#
# Rules (coreutils quotearg.c, shell_escape_quoting_style): a name of only safe characters is
# printed as it is; any other printable character puts the whole name in single quotes (a ' inside
# becomes '\''; a name whose only unsafe character is ' is put in double quotes); a control
# character, DEL, a C1 control or a byte that is not UTF-8 closes the quote and is written as
# $'\n' (the named escapes) or $'\ooo' (octal, per byte). Pure functions; no I/O.
from __future__ import annotations

import re

_SAFE = re.compile(r"[A-Za-z0-9%+,\-./:@_{}~#\x80-\U0010ffff]*")  # ~ and # only after the start
_NAMED = {7: "a", 8: "b", 9: "t", 10: "n", 11: "v", 12: "f", 13: "r"}


def _is_control(ch: str) -> bool:
    o = ord(ch)
    return o < 0x20 or 0x7F <= o < 0xA0 or 0xDC80 <= o <= 0xDCFF  # last: undecodable bytes


def _escape_char(ch: str) -> str:
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:  # surrogateescape: the original byte
        o -= 0xDC00
    elif o >= 0x80:  # a C1 control: its UTF-8 bytes
        return "".join(f"\\{b:03o}" for b in ch.encode())
    return "\\" + _NAMED[o] if o in _NAMED else f"\\{o:03o}"


def escape_name(name: bytes | str) -> str:
    """A name as GNU ls shows it on a terminal."""
    s = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name
    control = any(_is_control(c) for c in s)
    if s and not control and _SAFE.fullmatch(s) and not s.startswith(("~", "#")):
        return s
    if not s:
        return "''"
    if not control and "'" in s and not re.search(r"[\"$`\\!]", s):
        return f'"{s}"'
    # ls opens a quote first, even before an escape (''$'\033'), and runs of control characters
    # share one $'...'.
    out, state = ["'"], "quoted"
    for ch in s:
        if _is_control(ch):
            if state == "quoted":
                out.append("'$'")
            state = "escaped"
            out.append(_escape_char(ch))
            continue
        if state == "escaped":
            out.append("''")  # closes $'...' and opens a quote
        state = "quoted"
        out.append("'\\''" if ch == "'" else ch)
    out.append("'")
    return "".join(out)


def visible(text: str) -> str:
    """Text for a terminal with every control character written as ls -b writes it (\\n, \\t,
    \\033, octal per byte): for values in a table, where quoting each cell would be noise."""
    if not any(_is_control(c) for c in text):
        return text
    return "".join(_escape_char(c) if _is_control(c) else c for c in text)
