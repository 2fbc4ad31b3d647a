# Our own server configuration (postgres/config.py), table-driven: parsing as guc-file.l does, the
# allow-list, the forced settings, the notices. The oracle for the parser is PostgreSQL itself:
# test_parser_agrees_with_postgres checks a hostile-looking file against `postgres -C`.
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from kloset_blocks import postgres
from kloset_blocks.postgres import config as c

RUN = c.Run(
    sockdir="/run/x/pg", port=5432, hba_file="/run/x/pg/hba", ident_file="/run/x/pg/ident", read_only=True
)


@pytest.mark.parametrize(
    ("line", "name", "value"),
    [
        ("work_mem = 4MB", "work_mem", "4MB"),
        ("work_mem 4MB", "work_mem", "4MB"),  # the = is optional
        ("Work_Mem='4MB'  # comment", "work_mem", "4MB"),  # names are case-insensitive
        ("timezone = 'Etc/UTC'", "timezone", "Etc/UTC"),
        ("datestyle = 'iso, mdy'", "datestyle", "iso, mdy"),
        ("x = 'it''s'", "x", "it's"),  # doubled quote
        (r"x = 'a\'b'", "x", "a'b"),  # backslash escape
        (r"x = 'a\nb\tc\101'", "x", "a\nb\tcA"),  # named and octal escapes
        ("x = on", "x", "on"),
        ("x = -1", "x", "-1"),
        ("x = 0x1F", "x", "0x1F"),
        ("x = 1.5", "x", "1.5"),
        ("x = Etc/UTC", "x", "Etc/UTC"),  # an unquoted string may hold / : . -
        ("ext.setting = 1", "ext.setting", "1"),  # a qualified (extension) name
        ("include '/etc/passwd'", "include", "/etc/passwd"),  # a directive, parsed like a setting
        ("restore_command = 'id > /tmp/x; false'", "restore_command", "id > /tmp/x; false"),
    ],
)
def test_parse_line(line: str, name: str, value: str) -> None:
    parsed = c.parse(line + "\n", "f")
    assert parsed.errors == []
    assert [(ln.name, ln.value) for ln in parsed.lines] == [(name, value)]


@pytest.mark.parametrize(
    "line",
    [
        "x = 1.5GB",  # a real takes no unit (guc-file.l: REAL then ID)
        "x = /tmp/a",  # an unquoted value cannot start with /
        "x = 'unterminated",
        "x = a b",
        "= 1",
        "x =",
        "x = 1e5",  # INTEGER "1e" then INTEGER "5"
        "'x' = 1",
    ],
)
def test_parse_errors(line: str) -> None:
    parsed = c.parse("ok = 1\n" + line + "\n", "postgresql.conf")
    assert parsed.errors == ["postgresql.conf line 2"]
    assert [ln.name for ln in parsed.lines] == ["ok"]


def test_parser_agrees_with_postgres() -> None:
    # The oracle: `postgres -C NAME` reads the same file and says what it made of each value.
    text = (
        "work_mem 5MB\n"
        "log_line_prefix = 'it''s a\\tb'\n"
        "Search_Path = '\"$user\", public'  # trailing comment\n"
        "cluster_name = abc-def.ghi:1/2\n"
        "cluster_name = 'later wins'\n"
    )
    parsed = c.parse(text, "postgresql.conf")
    assert parsed.errors == []
    last = {ln.name: ln.value for ln in parsed.lines}
    data = Path(tempfile.mkdtemp(prefix="kb-conf-"))  # /tmp itself: pytest's tmp is 0700
    try:
        os.chown(data, *postgres.pg_ids())
        (data / "postgresql.conf").write_text(text)
        for name, value in last.items():
            got = subprocess.run(
                ["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/postgres", "-D", str(data),
                 "-C", name],
                capture_output=True, text=True, cwd="/",
            )  # fmt: skip
            assert got.returncode == 0, got.stderr
            assert got.stdout.rstrip("\n") == ("5120" if name == "work_mem" else value), name  # kB
    finally:
        shutil.rmtree(data)


# --- build: what is brought over, forced, dropped ------------------------------------------------

HOSTILE = {
    "restore_command = 'touch /tmp/canary'": ("restore_command", "runs a program"),
    "archive_command = 'touch /tmp/canary'": ("archive_command", "runs a program"),
    "archive_mode = on": ("archive_mode", None),
    "archive_library = 'evil'": ("archive_library", None),
    "recovery_end_command = 'touch /tmp/canary'": ("recovery_end_command", "runs a program"),
    "archive_cleanup_command = 'touch /tmp/canary'": ("archive_cleanup_command", "runs a program"),
    "ssl_passphrase_command = 'touch /tmp/canary'": ("ssl_passphrase_command", "runs a program"),
    "ssl = on": ("ssl", None),
    "shared_preload_libraries = 'pg_stat_statements'": ("shared_preload_libraries", None),
    "session_preload_libraries = 'base/evil'": ("session_preload_libraries", None),
    "local_preload_libraries = 'evil'": ("local_preload_libraries", None),
    "dynamic_library_path = '/tmp'": ("dynamic_library_path", None),
    "jit_provider = '/tmp/evil'": ("jit_provider", "loads a library"),
    "log_directory = '/etc'": ("log_directory", "names a path"),
    "logging_collector = on": ("logging_collector", None),
    "data_directory = '/etc'": ("data_directory", "names a path"),
    "external_pid_file = '/etc/passwd'": ("external_pid_file", None),
    "include '/etc/passwd'": ("include", "includes a host file"),
    "include_if_exists = '/etc/shadow'": ("include_if_exists", "includes a host file"),
    "include_dir '/etc'": ("include_dir", "includes a host file"),
    "listen_addresses = '*'": ("listen_addresses", None),
    "port = 5433": ("port", None),
    "unix_socket_directories = '/tmp'": ("unix_socket_directories", None),
    "primary_conninfo = 'host=198.51.100.1'": ("primary_conninfo", None),
    "hba_file = '/etc/passwd'": ("hba_file", None),
    "hot_standby = off": ("hot_standby", None),
    "default_transaction_read_only = off": ("default_transaction_read_only", None),
    "shared_buffers = 'lots'": ("shared_buffers", "not a number"),
    "timezone = '../../../etc/passwd'": ("timezone", "not an accepted value"),
    "lc_messages = 'C; touch x'": ("lc_messages", "not an accepted value"),
    "wal_level = 'paranoid'": ("wal_level", "not a known value"),
    "evil.thing = 1": ("evil.thing", "not on the allow-list"),
}


@pytest.mark.parametrize("line", list(HOSTILE), ids=[v[0] for v in HOSTILE.values()])
def test_hostile_setting_never_reaches_our_file(line: str) -> None:
    name, why = HOSTILE[line]
    cfg = c.build([("postgresql.conf", "work_mem = 4MB\n"), ("postgresql.auto.conf", line + "\n")], 15, RUN)
    snapshot_value = c.parse(line, "x").lines[0].value
    written = {ln.name: ln.value for ln in c.parse(cfg.text, "ours").lines}
    assert c.parse(cfg.text, "ours").errors == []
    assert written["work_mem"] == "4MB"  # the vetted setting still comes over
    assert written.get(name) != snapshot_value
    assert cfg.settings == written
    forced = c.forced(15, RUN)
    if name in forced:
        assert written[name] == forced[name] and name in cfg.overridden
        assert any(name in n and "replaced by ours" in n for n in cfg.notices())
    else:
        assert name not in written and cfg.dropped[name] == why
        assert any(f"{name} ({why})" in n for n in cfg.notices())
    assert all(snapshot_value not in n for n in cfg.notices()), "a value never reaches the notices"


def test_forced_settings_are_safe_whatever_the_snapshot() -> None:
    f = c.forced(15, RUN)
    assert f["listen_addresses"] == "" and f["unix_socket_directories"] == RUN.sockdir
    assert f["archive_mode"] == "off" and f["ssl"] == "off" and f["hot_standby"] == "on"
    empty = """restore_command archive_command archive_library recovery_end_command archive_cleanup_command
    ssl_passphrase_command primary_conninfo shared_preload_libraries session_preload_libraries
    local_preload_libraries"""
    for name in empty.split():
        assert f[name] == "", name
    assert f["dynamic_library_path"] == "$libdir" and f["logging_collector"] == "off"


@pytest.mark.parametrize(("major", "present", "absent"), [
    (13, [], ["archive_library", "event_triggers"]),
    (15, ["archive_library"], ["event_triggers"]),
    (17, ["archive_library", "event_triggers"], []),
])  # fmt: skip
def test_forced_settings_per_major(major: int, present: list[str], absent: list[str]) -> None:
    # Postgres refuses a name it does not know in a file: a major gets only its own settings.
    f = c.forced(major, RUN)
    assert all(n in f for n in present) and not any(n in f for n in absent)


def test_later_file_wins_and_order_is_postgres_order() -> None:
    cfg = c.build(
        [
            ("postgresql.conf", "work_mem = 1MB\ntimezone = 'UTC'\n"),
            ("postgresql.auto.conf", "work_mem = 2MB\n"),
        ],
        15,
        RUN,
    )
    assert cfg.settings["work_mem"] == "2MB" and cfg.settings["timezone"] == "UTC"


def test_golden_config_brings_over_what_starts_it(fixtures_dir: Path) -> None:
    # golden-plain's own postgresql.conf (restored once to a directory by the e2e tests; here its
    # relevant lines): sizes and locale come over; its port and socket directory are ours.
    text = (
        "max_connections = 100\nshared_buffers = 128MB\ndatestyle = 'iso, mdy'\ntimezone = 'Etc/UTC'\n"
        "lc_messages = 'C'\nport = 54331\nlisten_addresses = ''\n"
        "unix_socket_directories = '/tmp/klosetgo/sock'\n"
        "wal_level = replica\nmax_wal_senders = 4\n"
    )
    cfg = c.build([("postgresql.conf", text)], 15, RUN)
    assert cfg.settings["shared_buffers"] == "128MB" and cfg.settings["datestyle"] == "iso, mdy"
    assert cfg.settings["port"] == "5432" and cfg.overridden == ["port", "unix_socket_directories"]
    assert cfg.dropped == {} and cfg.errors == []


@pytest.mark.parametrize(("conf", "floors", "expected"), [
    ("max_connections = 10\n", {"max_connections": 100}, "100"),  # raised to the primary's
    ("max_connections = 200\n", {"max_connections": 100}, "200"),  # more is fine
    ("", {"max_locks_per_transaction": 128}, None),  # absent: set only where a floor is known
])  # fmt: skip
def test_control_floors(conf: str, floors: dict[str, int], expected: str | None) -> None:
    cfg = c.build([("postgresql.conf", conf)], 15, RUN, floors)
    name = next(iter(floors))
    assert cfg.settings.get(name, None) == (expected or str(floors[name]))


def test_control_floors_from_pg_controldata_text() -> None:
    text = (
        "wal_level setting:                    replica\nmax_connections setting:              100\n"
        "max_prepared_xacts setting:           0\nmax_locks_per_xact setting:           64\n"
        "max_wal_senders setting:              99999999999\n"
    )
    assert c.control_floors(text) == {
        "max_connections": 100, "max_prepared_transactions": 0, "max_locks_per_transaction": 64,
    }  # fmt: skip


def test_notices_escape_names() -> None:
    cfg = c.build([("postgresql.conf", "evil.\x1b[2J = 1\n")], 15, RUN)
    assert all("\x1b" not in n for n in cfg.notices())


@pytest.mark.parametrize("value", ["a\nb", "a\0b"])
def test_quote_refuses_what_a_line_cannot_hold(value: str) -> None:
    with pytest.raises(ValueError):
        c.quote(value)


@pytest.mark.parametrize("value", ["plain", "it's", "back\\slash", "$libdir", ""])
def test_quote_round_trips(value: str) -> None:
    assert c.parse(f"x = {c.quote(value)}", "f").lines[0].value == value
