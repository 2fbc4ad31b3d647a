# Writing a store to a remote backend, for `mkstore` only (tests, the demo, the benchmark): the
# project's writer works on a local directory, so a remote mkstore mirrors the store's CONFIG and
# states into a temporary directory (all the writer reads of an existing store: it deduplicates
# against the states), runs the writer there, and uploads what it added: packfiles first, then
# states, then CONFIG (a new store only), so a reader never sees a state whose packfiles are not
# there yet. Nothing already in the bucket or remote directory is overwritten or deleted.
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

from kloset_blocks.errors import StoreError
from kloset_blocks.store.backend import Backend, open_backend
from kloset_blocks.store.location import StoreLocation
from kloset_blocks.store.options import retry, store_options

ORDER = ("packfiles/", "states/", "CONFIG")


@contextlib.contextmanager
def remote_workdir(loc: StoreLocation) -> Iterator[str]:
    """A local directory holding the remote store's CONFIG and states (empty for a new store);
    on a normal exit, what the writer added in it is uploaded."""
    _ensure_root(loc)
    backend = open_backend(loc)
    tmp = tempfile.mkdtemp(prefix="kloset-mkstore-")
    try:
        existing = set(backend.list("states/")) | set(backend.list("packfiles/"))
        try:
            _save(tmp, "CONFIG", backend.read("CONFIG"))
            existing.add("CONFIG")
            for kind in ("packfiles", "states"):  # the writer expects the layout's directories
                os.makedirs(os.path.join(tmp, kind), exist_ok=True)
        except FileNotFoundError:
            pass
        for key in existing:
            if key.startswith("states/"):
                _save(tmp, key, backend.read(key))
        yield tmp
        upload(tmp, loc, backend, existing)
    finally:
        backend.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _save(root: str, key: str, data: bytes) -> None:
    path = os.path.join(root, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def upload(root: str, loc: StoreLocation, backend: Backend, existing: set[str]) -> None:
    keys = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            key = os.path.relpath(os.path.join(dirpath, name), root)
            if key not in existing and not name.startswith("."):
                keys.append(key)
    put = _putter(loc, backend)
    for first in ORDER:
        for key in sorted(k for k in keys if k.startswith(first)):
            with open(os.path.join(root, key), "rb") as f:
                put(key, f.read())


def _ensure_root(loc: StoreLocation) -> None:
    """Create the bucket (s3) or directory (sftp) of a new store."""
    if loc.scheme == "s3":
        from kloset_blocks.store.backend_s3 import S3Client, _describe

        client = S3Client(loc, store_options("s3"), 4)
        try:
            _make_bucket(client, loc.bucket)
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"cannot create bucket {loc.bucket} at {loc.host}: {_describe(e)}") from None
        finally:
            client.close()
    elif loc.scheme == "sftp":
        from kloset_blocks.store.backend_sftp import connect

        client = connect(loc, store_options("sftp"))
        try:
            _mkdirs(client.open_sftp(), loc.path)
        except OSError as e:
            raise StoreError(f"cannot create {loc.display}: {e.strerror or e}") from None
        finally:
            client.close()


def _make_bucket(client, bucket: str) -> None:  # type: ignore[no-untyped-def]
    """CreateBucket unless HeadBucket finds it (outside us-east-1 the region goes in the body)."""
    from kloset_blocks.store.backend_s3 import S3Error, read_all

    try:
        client.request("HEAD", f"/{bucket}").release_conn()
        return
    except S3Error as e:
        if e.status != 404:
            raise
    body = b""
    if client.region != "us-east-1":
        body = (
            '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<LocationConstraint>{client.region}</LocationConstraint></CreateBucketConfiguration>"
        ).encode()
    read_all(client.request("PUT", f"/{bucket}", body=body, payload_hash=hashlib.sha256(body).hexdigest()))


def _putter(loc: StoreLocation, backend: Backend) -> Callable[[str, bytes], None]:
    if loc.scheme == "s3":
        from kloset_blocks.store.backend_s3 import _describe, _transient, read_all

        client = backend.client  # type: ignore[attr-defined]

        def put_s3(key: str, data: bytes) -> None:
            digest = hashlib.sha256(data).hexdigest()

            def once() -> bytes:
                path = f"/{loc.bucket}/{loc.path}{key}"
                return read_all(client.request("PUT", path, body=data, payload_hash=digest))

            retry(once, f"cannot write {backend.describe(key)}", _transient, backend.attempts, _describe)  # type: ignore[attr-defined]

        return put_s3
    sftp = backend.client().open_sftp()  # type: ignore[attr-defined]

    def put_sftp(key: str, data: bytes) -> None:
        path = f"{loc.path}/{key}"
        _mkdirs(sftp, os.path.dirname(path))
        tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp"
        with sftp.open(tmp, "wb") as f:
            f.write(data)
        sftp.posix_rename(tmp, path)

    return put_sftp


def _mkdirs(sftp, path: str) -> None:  # type: ignore[no-untyped-def]
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        d = "/" + "/".join(parts[:i])
        try:
            sftp.stat(d)
        except FileNotFoundError:
            sftp.mkdir(d)
