# The server's configuration is ours, not the snapshot's: a pure function from the snapshot's
# postgresql.conf / postgresql.auto.conf text to the one configuration file we start Postgres with.
#
# Strategy:
# - Parse the snapshot's files as Postgres does (guc-file.l: `name [=] value`, # comments,
#   single-quoted strings with '' and backslash escapes, later lines win, names case-insensitive).
#   include / include_if_exists / include_dir are recognized and refused: they name host files.
# - Bring over only settings on a vetted allow-list (sizes, WAL, counts the WAL replay checks,
#   locale and formatting), each value checked against its kind; a value Postgres would refuse is
#   dropped too (a bad line must not stop the start: the default is used instead).
# - Everything else keeps Postgres' compiled-in default, except the FORCED settings, which we
#   always write: nothing runs a program or loads a library, nothing listens on TCP, nothing names a
#   path outside the data directory but our own private files.
# - Per-major differences are tables keyed by major (ALLOWED_BY_MAJOR, FORCED_BY_MAJOR): a setting
#   that a major does not know must not be written (Postgres refuses unknown names in a file).
#
# Invariants: no I/O here (the thin layer in server.py reads the files and writes the result); the
# output names every forced setting exactly once, after any brought-over one, so ours always win;
# notices name settings, never their values (a value may be a host secret a snapshot tried to read).
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kloset_blocks.names import escape_name

# --- parsing, as guc-file.l does ---------------------------------------------------------------

_LETTER = r"A-Za-z_\x80-\U0010ffff"
_ID = rf"[{_LETTER}][{_LETTER}0-9]*"
_TOKENS_PATTERN = rf"""
    (?P<ws>[ \t\r]+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>'(?:[^'\\\n]|\\.|'')*')
  | (?P<real>[-+]?\d*\.\d*(?:[Ee][-+]?\d+)?)
  | (?P<integer>[-+]?(?:0x[0-9a-fA-F]+|\d+)[a-zA-Z]*)
  | (?P<qualified>{_ID}\.{_ID}(?![-.:/{_LETTER}0-9]))
  | (?P<id>{_ID}(?![-.:/{_LETTER}0-9]))
  | (?P<unquoted>[{_LETTER}](?:[{_LETTER}0-9]|[-._:/])*)
  | (?P<equals>=)
  | (?P<error>.)
    """


@functools.cache
def _token_rx() -> re.Pattern[str]:
    # Compiled on first use: the Unicode ranges make it cost ~45 ms, paid otherwise by every
    # command's start (this module is imported by all that start Postgres).
    return re.compile(_TOKENS_PATTERN, re.VERBOSE)


_VALUE_TOKENS = ("id", "string", "integer", "real", "unquoted")
INCLUDE_DIRECTIVES = ("include", "include_if_exists", "include_dir")


@dataclass(frozen=True)
class Line:
    """One `name = value` of a configuration file (value unquoted and unescaped)."""

    name: str  # lower case, as Postgres compares names
    value: str
    file: str
    lineno: int


@dataclass
class Parsed:
    lines: list[Line] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "postgresql.conf line 3" (no content)


def _tokens(line: str) -> list[tuple[str, str]]:
    out = []
    pos = 0
    while pos < len(line):
        m = _token_rx().match(line, pos)
        assert m is not None  # (?P<error>.) matches anything but a newline, and lines have none
        kind = m.lastgroup or "error"
        if kind not in ("ws", "comment"):
            out.append((kind, m.group()))
        pos = m.end()
    return out


def unquote(token: str) -> str:
    """DeescapeQuotedString: strip the quotes; \\b \\f \\n \\r \\t, up to three octal digits, ''
    -> ', and a backslash before anything else stands for that thing."""
    s, out, i = token[1:-1], [], 0
    simple = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s):
            nxt = s[i + 1]
            if nxt in simple:
                out.append(simple[nxt])
                i += 2
            elif nxt in "01234567":
                m = re.match(r"[0-7]{1,3}", s[i + 1 :])
                assert m is not None
                out.append(chr(int(m.group(), 8) & 0xFF))
                i += 1 + len(m.group())
            else:
                out.append(nxt)
                i += 2
        elif ch == "'" and s[i + 1 : i + 2] == "'":
            out.append("'")
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse(text: str, file: str) -> Parsed:
    """The `name = value` lines of one file, in order. A line Postgres would reject is an error
    (named by file and line number only)."""
    parsed = Parsed()
    for lineno, raw in enumerate(text.split("\n"), 1):
        toks = _tokens(raw)
        if not toks:
            continue
        if toks[0][0] in ("id", "qualified"):
            name, rest = toks[0][1], toks[1:]
            if rest and rest[0][0] == "equals":
                rest = rest[1:]
            if len(rest) == 1 and rest[0][0] in _VALUE_TOKENS:
                kind, value = rest[0]
                value = unquote(value) if kind == "string" else value
                parsed.lines.append(Line(name.lower(), value, file, lineno))
                continue
        parsed.errors.append(f"{file} line {lineno}")
    return parsed


# --- the allow-list ------------------------------------------------------------------------------


class Refused(Exception):
    """A value that is not brought over (the message says why, without the value)."""


Check = Callable[[str], str]  # returns the value to write, or raises Refused

_BOOL = {"on", "off", "true", "false", "yes", "no", "1", "0"}
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*[A-Za-z]{0,3}")


def boolean(value: str) -> str:
    if value.strip().lower() not in _BOOL:
        raise Refused("not a boolean")
    return value.strip().lower()


def number(value: str) -> str:
    """An integer or real, with an optional unit (128MB, 5min): Postgres checks units and ranges; a
    value outside its range would stop the start, so only the shape is checked here."""
    if not _NUMBER.fullmatch(value.strip()):
        raise Refused("not a number")
    return value.strip()


def one_of(*choices: str) -> Check:
    def check(value: str) -> str:
        if value.strip().lower() not in choices:
            raise Refused("not a known value")
        return value.strip().lower()

    return check


def text(pattern: str, max_len: int = 64) -> Check:
    """Free text of a restricted shape (locale names, time zones): never a path that climbs."""
    rx = re.compile(pattern)

    def check(value: str) -> str:
        if len(value) > max_len or not rx.fullmatch(value) or ".." in value:
            raise Refused("not an accepted value")
        return value

    return check


def _names(words: str) -> list[str]:
    return words.split()


_LOCALE = text(r"[A-Za-z0-9_.@-]*")
_ZONE = text(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*")
_WORDS = text(r"[A-Za-z0-9_, ]+")

# Settings brought over from the snapshot (all majors). Counts the WAL replay checks against the
# primary's (max_connections ... max_locks_per_transaction) must be at least the primary's for a
# hot standby, hence kept; sizes and WAL settings shape the start; the rest makes answers look as
# they did on the origin (dates, time zone, locale of messages and numbers).
ALLOWED: dict[str, Check] = {
    **dict.fromkeys(
        _names("""shared_buffers work_mem maintenance_work_mem temp_buffers wal_buffers effective_cache_size
        max_wal_size min_wal_size wal_keep_size checkpoint_timeout checkpoint_completion_target
        max_connections superuser_reserved_connections max_worker_processes max_wal_senders
        max_replication_slots max_prepared_transactions max_locks_per_transaction
        max_pred_locks_per_transaction max_parallel_workers max_parallel_workers_per_gather
        autovacuum_max_workers extra_float_digits random_page_cost seq_page_cost
        effective_io_concurrency"""),
        number,
    ),
    **dict.fromkeys(
        _names(
            "full_page_writes wal_log_hints track_commit_timestamp autovacuum standard_conforming_strings"
        ),
        boolean,
    ),
    "wal_level": one_of("minimal", "replica", "logical", "archive", "hot_standby"),
    "wal_compression": one_of(*_BOOL, "pglz", "lz4", "zstd"),
    "dynamic_shared_memory_type": one_of("posix", "sysv", "mmap"),
    "bytea_output": one_of("hex", "escape"),
    "intervalstyle": one_of("postgres", "postgres_verbose", "sql_standard", "iso_8601"),
    "datestyle": _WORDS,
    "timezone": _ZONE,
    "log_timezone": _ZONE,
    "lc_messages": _LOCALE,
    "lc_monetary": _LOCALE,
    "lc_numeric": _LOCALE,
    "lc_time": _LOCALE,
    "default_text_search_config": text(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?"),
}

# Per-major additions to the allow-list (a major's own settings). 18 reads through asynchronous I/O:
# the snapshot's io_method (worker, sync, io_uring) is kept, io_uring only where this host's server
# can do it (HostLimits).
ALLOWED_BY_MAJOR: dict[int, dict[str, Check]] = {
    17: {"io_combine_limit": number},
    18: {
        "io_method": one_of("worker", "sync", "io_uring"),
        **dict.fromkeys(_names("io_workers io_max_concurrency io_max_combine_limit"), number),
    },
}


@dataclass(frozen=True)
class HostLimits:
    """What this host's server can do, for the settings a snapshot may carry that cannot work here
    (a start must not fail on them): memory bounds shared_buffers, io_uring needs the server built
    with liburing and a kernel that allows it."""

    memory: int | None = None  # bytes of RAM; shared_buffers above a quarter of it is not kept
    io_uring: bool = False


def _bytes(value: str, unit: int) -> int | None:
    """A memory setting in bytes: "4GB", "512MB", "16384" (in units of `unit` bytes, 8kB pages)."""
    m = re.fullmatch(r"\s*(\d+)\s*(kB|MB|GB|TB|B)?\s*", value)
    if not m:
        return None
    scale = {"B": 1, "kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}.get(m.group(2) or "", unit)
    return int(m.group(1)) * scale


def host_rules(kept: dict[str, str], major: int, host: HostLimits) -> dict[str, str]:
    """Replace in kept what cannot work on this host; returns {setting: why} for the notice."""
    why: dict[str, str] = {}
    if host.memory is not None and "shared_buffers" in kept:
        size = _bytes(kept["shared_buffers"], 8192)
        if size is None or size > host.memory // 4:
            del kept["shared_buffers"]
            why["shared_buffers"] = "more than a quarter of this host's memory: the default is used"
    if major >= 18 and kept.get("io_method") == "io_uring" and not host.io_uring:
        kept["io_method"] = "worker"
        why["io_method"] = "io_uring is not available here: worker is used"
    return why


# --- forced settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Where this server's private files are (the run directory's 0700 pg/ directory)."""

    sockdir: str
    port: int
    hba_file: str
    ident_file: str
    read_only: bool = False


# Why a setting of the snapshot is never used (its name -> reason), for the notice.
DANGEROUS = {
    **dict.fromkeys(
        _names(
            "restore_command archive_command recovery_end_command archive_cleanup_command "
            "ssl_passphrase_command"
        ),
        "runs a program",
    ),
    **dict.fromkeys(
        _names(
            "shared_preload_libraries session_preload_libraries local_preload_libraries dynamic_library_path "
            "archive_library jit_provider"
        ),
        "loads a library",
    ),
    **dict.fromkeys(
        _names(
            "listen_addresses port unix_socket_directories unix_socket_group unix_socket_permissions bonjour "
            "bonjour_name ssl"
        ),
        "ours: no TCP, a private socket",
    ),
    **dict.fromkeys(
        _names("primary_conninfo primary_slot_name archive_mode hot_standby promote_trigger_file"),
        "ours: no primary, no archive",
    ),
    **dict.fromkeys(
        _names("""data_directory config_file hba_file ident_file external_pid_file log_directory
        logging_collector
        log_destination stats_temp_directory krb_server_keyfile ssl_cert_file ssl_key_file ssl_ca_file
        ssl_crl_file ssl_crl_dir"""),
        "names a path",
    ),
    **dict.fromkeys(INCLUDE_DIRECTIVES, "includes a host file"),
}


def forced(major: int, run: Run) -> dict[str, str]:
    """The settings we always write, whatever the snapshot says."""
    out = {
        "listen_addresses": "",
        "port": str(run.port),
        "unix_socket_directories": run.sockdir,
        "unix_socket_permissions": "0700",
        "hba_file": run.hba_file,
        "ident_file": run.ident_file,
        "external_pid_file": "",
        "ssl": "off",
        "ssl_passphrase_command": "",
        "bonjour": "off",
        "archive_mode": "off",
        "archive_command": "",
        "restore_command": "",
        "recovery_end_command": "",
        "archive_cleanup_command": "",
        "primary_conninfo": "",
        "primary_slot_name": "",
        "shared_preload_libraries": "",
        "session_preload_libraries": "",
        "local_preload_libraries": "",
        "dynamic_library_path": "$libdir",
        "jit": "off",
        "logging_collector": "off",
        "log_destination": "stderr",
        "hot_standby": "on",
        "default_transaction_read_only": "on" if run.read_only else "off",
    }
    for since, settings in sorted(FORCED_BY_MAJOR.items()):
        if major >= since:
            out.update(settings)
    for until, names in REMOVED_IN_MAJOR.items():
        if major >= until:
            for name in names:
                out.pop(name, None)
    return out


# Settings a major added (forced from that major on) and settings a major removed (never written
# from that major on). Keyed by the first major concerned.
FORCED_BY_MAJOR: dict[int, dict[str, str]] = {
    15: {"archive_library": ""},
    17: {"event_triggers": "off"},  # PostgreSQL 17's login event triggers run code on connection
}
REMOVED_IN_MAJOR: dict[int, tuple[str, ...]] = {}


# --- the result ----------------------------------------------------------------------------------


@dataclass
class Config:
    text: str  # our postgresql.conf
    settings: dict[str, str]  # what it sets, forced ones included
    dropped: dict[str, str] = field(default_factory=dict)  # snapshot setting -> why
    overridden: list[str] = field(default_factory=list)  # snapshot settings replaced by ours
    errors: list[str] = field(default_factory=list)  # lines Postgres could not parse

    def notices(self) -> list[str]:
        """At most three lines for stderr (names only, escaped)."""
        out = []
        if self.overridden:
            out.append("snapshot settings replaced by ours: " + ", ".join(map(_safe, self.overridden)))
        if self.dropped:
            items = [f"{_safe(n)} ({why})" for n, why in self.dropped.items()]
            out.append("snapshot settings not used: " + ", ".join(items))
        if self.errors:
            out.append("snapshot configuration lines ignored (not valid): " + ", ".join(self.errors))
        return out


def allowed(major: int) -> dict[str, Check]:
    out = dict(ALLOWED)
    for since, extra in sorted(ALLOWED_BY_MAJOR.items()):
        if major >= since:
            out.update(extra)
    return out


def major_number(major: str) -> int:
    """PG_VERSION's text as the number the tables are keyed by ("15" -> 15, "9.6" -> 9)."""
    return int(major.split(".")[0])


# pg_control's record of the primary's settings that a hot standby must at least match, by the
# name pg_controldata prints.
CONTROL_NAMES = {
    "max_connections": "max_connections",
    "max_worker_processes": "max_worker_processes",
    "max_wal_senders": "max_wal_senders",
    "max_prepared_xacts": "max_prepared_transactions",
    "max_locks_per_xact": "max_locks_per_transaction",
}
CONTROL_FLOORS = tuple(CONTROL_NAMES.values())
CONTROL_MAX = 1 << 20  # above any real setting: a larger number is not believed


def control_floors(controldata: str) -> dict[str, int]:
    """The floors from pg_controldata's output ("max_connections setting:   100")."""
    out = {}
    for m in re.finditer(r"^(\w+) setting:[ \t]+(\d{1,9})[ \t]*$", controldata, re.M):
        name = CONTROL_NAMES.get(m.group(1))
        if name is not None and int(m.group(2)) <= CONTROL_MAX:
            out[name] = int(m.group(2))
    return out


def build(
    files: Sequence[tuple[str, str]],
    major: int,
    run: Run,
    floors: Mapping[str, int] | None = None,
    host: HostLimits | None = None,
) -> Config:
    """Our configuration from the snapshot's files (name, text), in the order Postgres reads them
    (postgresql.conf, then postgresql.auto.conf). floors: the primary's values recorded in
    pg_control (pg_controldata), raised to where the file says less (a hot standby refuses less)."""
    ours = forced(major, run)
    allow = allowed(major)
    last: dict[str, Line] = {}
    errors: list[str] = []
    for name, body in files:
        parsed = parse(body, name)
        errors += parsed.errors
        for line in parsed.lines:
            last.pop(line.name, None)  # keep the order of the last occurrence
            last[line.name] = line
    kept: dict[str, str] = {}
    dropped: dict[str, str] = {}
    overridden: list[str] = []
    for name, line in last.items():
        if name in ours:
            if ours[name] != line.value:
                overridden.append(name)
            continue
        check = allow.get(name)
        if check is None:
            dropped[name] = DANGEROUS.get(name, "not on the allow-list")
            continue
        try:
            kept[name] = check(line.value)
        except Refused as e:
            dropped[name] = str(e)
    if host is not None:
        dropped.update(host_rules(kept, major, host))
    for name, floor in (floors or {}).items():
        if name in CONTROL_FLOORS and floor > _int_or(kept.get(name), -1):
            kept[name] = str(floor)
    settings = {**kept, **ours}
    return Config(render(kept, ours), settings, dropped, overridden, errors)


def _int_or(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def render(kept: Mapping[str, str], ours: Mapping[str, str]) -> str:
    out = ["# Written by kloset-blocks: the snapshot's vetted settings, then ours (which win)."]
    out += [f"{k} = {quote(v)}" for k, v in kept.items()]
    out.append("# forced")
    out += [f"{k} = {quote(v)}" for k, v in ours.items()]
    return "\n".join(out) + "\n"


def quote(value: str) -> str:
    """A single-quoted string Postgres reads back as value (any type accepts one)."""
    if "\n" in value or "\0" in value:
        raise ValueError("a configuration value cannot hold a newline or NUL")
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _safe(name: str) -> str:
    return escape_name(name)
