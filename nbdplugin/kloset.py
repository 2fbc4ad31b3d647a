# nbdkit Python plugin: serve a Kloset snapshot as a read-only ext4 block device.
#
#   nbdkit python nbdplugin/kloset.py store=fs:/var/backups snapshot=9f3a [path=/data] [owner=postgres]
#
# A thin facade: every callback forwards to kloset_blocks.serving.server.Server. Run `nbdkit python
# nbdplugin/kloset.py --help` for the parameters. The passphrase of an encrypted store comes from
# $PLAKAR_PASSPHRASE, passphrase=+FILE or passphrase=- (prompt); never put it in argv.
import errno
import os
import sys
import traceback

import nbdkit

API_VERSION = 2


def _add_project_to_path() -> None:
    # nbdkit's embedded interpreter gives the script no __file__, and neither its directory nor the
    # current one is on sys.path. The script's path is in nbdkit's own argv, though: from it, find
    # the checkout (kloset_blocks/ beside nbdplugin/) and its virtualenv, and put both ahead of
    # Debian's dist-packages (whose older cryptography lacks AES-GCM-SIV). Entries from PYTHONPATH,
    # when set, stay first.
    with open("/proc/self/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    for arg in argv:
        if arg.endswith(b".py") and os.path.isfile(arg):
            repo = os.path.dirname(os.path.dirname(os.path.abspath(os.fsdecode(arg))))
            if os.path.isdir(os.path.join(repo, "kloset_blocks")):
                py = f"python{sys.version_info.major}.{sys.version_info.minor}"
                venv = os.path.join(repo, ".venv", "lib", py, "site-packages")
                first = len([p for p in os.environ.get("PYTHONPATH", "").split(":") if p])
                sys.path[first:first] = [p for p in (repo, venv) if p not in sys.path]
                return


_add_project_to_path()

from kloset_blocks.errors import KlosetError  # noqa: E402
from kloset_blocks.serving.server import CONFIG_HELP, CONFIG_KEYS, Server  # noqa: E402

server = Server()
config_help = CONFIG_HELP


def _fail_startup(e: KlosetError) -> None:
    # Startup errors are the user's to fix: one line, exit 1, no Python traceback (which is what
    # nbdkit prints for an exception raised from a callback).
    sys.stderr.write(f"nbdkit: kloset: error: {e}\n")
    sys.stderr.flush()
    os._exit(1)


def dump_plugin():
    print("kloset_config_keys=" + ",".join(CONFIG_KEYS))
    print("kloset_thread_model=parallel")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    try:
        server.configure(key, value)
    except KlosetError as e:
        _fail_startup(e)


def config_complete():
    try:
        server.config_complete()
    except KlosetError as e:
        _fail_startup(e)


def get_ready():
    try:
        server.get_ready()
    except KlosetError as e:
        _fail_startup(e)
    nbdkit.debug(f"kloset: default export {server.default_export}")


def after_fork():
    try:
        server.after_fork()  # in an nbdkit that never forks, builds the image (Server.get_ready)
    except KlosetError as e:
        _fail_startup(e)


def cleanup():
    nbdkit.debug(f"kloset: stats {server.stats()}")
    server.cleanup()


def list_exports(readonly, is_tls):
    return server.list_exports()


def default_export(readonly, is_tls):
    return server.default_export


class OneLine(Exception):
    """An error nbdkit is to log as its message alone: a failed read or open is the store's fault,
    not the plugin's, and its traceback (35 lines each) told nothing more."""


def _format_exception(exc, value=None, tb=None, **kw):
    # nbdkit's Python plugin logs an exception raised by a callback through
    # traceback.format_exception() (plugins/python/errors.c, print_python_traceback), and raising is
    # the only way a callback can fail a request: so our own errors are formatted as one line here.
    if isinstance(value, OneLine) or (value is None and isinstance(exc, OneLine)):
        return [str(value if value is not None else exc)]
    return _traceback_format_exception(exc, value, tb, **kw)


_traceback_format_exception = traceback.format_exception
traceback.format_exception = _format_exception


def open(readonly):
    try:
        return server.open(nbdkit.export_name())
    except KlosetError as e:
        nbdkit.set_error(errno.ENOENT)
        raise OneLine(f"open of export {nbdkit.export_name()!r}: {e}") from None


def close(h):
    server.close(h)


def export_description(h):
    return h.description


def get_size(h):
    return h.image.size


def block_size(h):
    # Python costs ~50 us a request: ask clients for large ones. Minimum 1, maximum 32 MiB.
    return (1, 256 * 1024, 32 * 1024 * 1024)


def can_write(h):
    return False


def can_multi_conn(h):
    return True


def is_rotational(h):
    return False


def can_cache(h):
    return nbdkit.CACHE_NATIVE


def can_extents(h):
    return True


def pread(h, buf, offset, flags):
    try:
        server.pread(h, buf, offset)
    except KlosetError as e:
        # Corrupt or missing data fails this request only; the server keeps serving the rest.
        nbdkit.set_error(errno.EIO)
        raise OneLine(server.read_failed(h, offset, len(buf), e)) from None


def cache(h, count, offset, flags):
    server.prefetch(h, offset, count)


def extents(h, count, offset, flags):
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    return [(off, length, hole if zero else 0) for off, length, zero in server.extents(h, offset, count)]
