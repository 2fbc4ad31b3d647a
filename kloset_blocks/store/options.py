# Options of remote store backends, named as plakar names them: for s3 `access_key`,
# `secret_access_key`, `use_tls` (default true), `tls_insecure_no_verify`, `region`; for sftp
# `identity` (a private key file), `insecure_ignore_host_key` and `known_hosts` (a file read besides
# ~/.ssh/known_hosts); for both `timeout` (seconds per request) and `retries`.
#
# Where they come from, first wins: the store config file (`--store-config FILE`, key=value lines,
# `#` comments), whose path travels in $KLOSET_BLOCKS_STORE_CONFIG so that the nbdkit started for a
# command reads the same file; then the standard AWS environment (AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_REGION / AWS_DEFAULT_REGION). Never from argv: a secret on a command
# line is visible to every user of the machine.
#
# Also here: retry(), the one bounded-retry-with-backoff loop every remote request goes through.
from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

from kloset_blocks.errors import StoreError

CONFIG_ENV = "KLOSET_BLOCKS_STORE_CONFIG"
KNOWN = {
    "s3": {
        "access_key",
        "secret_access_key",
        "use_tls",
        "tls_insecure_no_verify",
        "region",
        "timeout",
        "retries",
    },
    "sftp": {"identity", "insecure_ignore_host_key", "known_hosts", "timeout", "retries"},
}
_AWS_ENV = (
    ("access_key", "AWS_ACCESS_KEY_ID"),
    ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
    ("region", "AWS_REGION"),
    ("region", "AWS_DEFAULT_REGION"),
)
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 4

T = TypeVar("T")


def read_config_file(path: str) -> dict[str, str]:
    """key=value lines; blank lines and `#` comments skipped; a bad line is one clear error."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise StoreError(f"cannot read store config {path}: {e.strerror}") from None
    out: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        if not eq or not key.strip():
            raise StoreError(f"store config {path}, line {n}: expected key=value")
        out[key.strip().lower()] = value.strip()
    return out


def use_config_file(path: str) -> None:
    """Make `path` the store config file of this process and the nbdkit it starts."""
    read_config_file(path)  # a missing or malformed file fails now, in the caller's words
    os.environ[CONFIG_ENV] = os.path.abspath(path)


def store_options(scheme: str) -> dict[str, str]:
    """The options for a backend of `scheme`, from the config file then the environment."""
    opts: dict[str, str] = {}
    path = os.environ.get(CONFIG_ENV)
    if path:
        opts = read_config_file(path)
        unknown = sorted(set(opts) - KNOWN.get(scheme, set()))
        if unknown:
            raise StoreError(f"store config {path}: unknown option {unknown[0]} for an {scheme} store")
    if scheme == "s3":
        for key, env in _AWS_ENV:
            if key not in opts and os.environ.get(env):
                opts[key] = os.environ[env]
    return opts


def parse_bool(opts: dict[str, str], key: str, default: bool) -> bool:
    value = opts.get(key)
    if value is None or value == "":
        return default
    v = value.lower()
    if v in ("1", "t", "true", "yes", "on"):
        return True
    if v in ("0", "f", "false", "no", "off"):
        return False
    raise StoreError(f"store option {key}={value}: expected true or false")


def parse_number(opts: dict[str, str], key: str, default: float) -> float:
    value = opts.get(key)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number < 0:
        raise StoreError(f"store option {key}={value}: expected a non-negative number")
    return number


def retry(
    call: Callable[[], T],
    what: str,
    transient: Callable[[BaseException], bool],
    attempts: int,
    describe: Callable[[BaseException], str] = str,
) -> T:
    """call() until it succeeds or fails `attempts` times; only errors `transient` accepts are
    retried, after 0.1, 0.2, 0.4 ... s (capped at 2 s). The final failure is one StoreError line."""
    delay = 0.1
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except StoreError:
            raise
        except FileNotFoundError:
            raise
        except Exception as e:
            if not transient(e) or attempt == attempts:
                tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                raise StoreError(f"{what}: {describe(e)}{tries}") from None
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")
