"""A remote store's last view (store/view.py) and the start from it (app/check.prepare with
from_last_view): the command starts without waiting for the store's listing, and its answer waits
for the check that the store still serves what the view said; a store that changed since (a new
state: `latest` moved) makes that check fail, and a start on what the check read serves the new
snapshot, while a snapshot named by its id is still served after a state that only adds."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kloset_blocks.app.check import prepare
from kloset_blocks.errors import StaleView
from kloset_blocks.store import open_store
from kloset_blocks.store.backend_s3 import S3Backend
from kloset_blocks.store.location import parse_location
from kloset_blocks.store.view import MAX_VIEW, load_view, save_view, view_path
from tests.remote_servers import S3Server
from tests.test_remote_store import _counted_calls

A = "bf6afbaef15411cad49bd0cb276075c35b157f0d9b2ac15c9fad05e346641a7c"
B = "3b116f400535e37b338dd8f220ffa26fe9d3c1df8f7ed35994f9df090323efa2"
B_STATE = f"states/{B[:2]}/{B}"


@pytest.fixture(scope="module")
def view(fixtures_dir: Path) -> tuple[str, str]:
    with open_store(str(fixtures_dir / "golden-plain")) as st:
        return st.location, st.view()


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("the view", "the view"),
        ("", None),  # nothing saved
        ("not json", None),
        ("another store's", None),  # the view names another location
        ("oversized", None),
        ("a key outside states/", None),
        (b"\xff\xfe", None),  # not text
    ],
)
def test_a_saved_view_is_read_back_only_whole_and_for_its_own_store(
    written: str | bytes, expected: str | None, view: tuple[str, str], tmp_path: Path
) -> None:
    location, text = view
    contents: dict[str, str | bytes] = {
        "the view": text,
        "not json": text[:-1],
        "another store's": text.replace(location, location + "-elsewhere"),
        "oversized": text + " " * MAX_VIEW,
        "a key outside states/": text.replace(f"states/{A[:2]}/{A}", f"states/../{A}"),
    }
    data = contents.get(written, written) if isinstance(written, str) else written
    if written == "the view":
        save_view(str(tmp_path), location, text)
    elif data:
        path = view_path(str(tmp_path), location)
        path.parent.mkdir(parents=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    assert load_view(str(tmp_path), location) == (text if expected else None)
    assert not list(tmp_path.rglob(".*"))  # no temporary file left


def test_a_view_is_kept_per_location(view: tuple[str, str], tmp_path: Path) -> None:
    location, text = view
    save_view(str(tmp_path), location, text)
    assert load_view(str(tmp_path), location + "/other") is None
    (tmp_path / "file").write_text("")
    save_view(str(tmp_path / "file"), location, text)  # cannot be written there: ignored, no error
    assert load_view(str(tmp_path / "file"), location) is None


def test_a_start_from_the_last_view_waits_for_nothing_and_its_check_catches_a_changed_store(
    s3: S3Server, fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store as it was before B's backup (no state of B), then as it is after.
    before = tmp_path / "before"
    src = fixtures_dir / "golden-plain"
    for p in src.rglob("*"):
        if p.is_file() and str(p.relative_to(src)) != B_STATE:
            (before / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (before / p.relative_to(src)).write_bytes(p.read_bytes())
    s3.put_tree(before, "lastview", "p")
    monkeypatch.setenv("KLOSET_BLOCKS_STORE_CONFIG", str(s3.config(tmp_path / "s3.conf")))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    location = s3.location("lastview", "p")
    calls = _counted_calls(monkeypatch, S3Backend)
    # Every listing waits for `listed` to be set: a start that waited for one would not return.
    listed, asked = threading.Event(), threading.Event()
    listing = S3Backend.list

    def held_list(self: S3Backend, prefix: str) -> list[str]:
        asked.set()
        listed.wait(30)
        return listing(self, prefix)

    monkeypatch.setattr(S3Backend, "list", held_list)

    def start(from_last_view: bool = True) -> tuple[str, object]:
        served = prepare(location, "latest", pgdata=True, from_last_view=from_last_view)
        return served.snapshot_id, served

    def fetched_for_recovery() -> None:
        """The command's fetch of what recovery reads first (app/check._fetch_then) is over."""
        for thread in threading.enumerate():
            if thread.name == "kloset-recovery":
                thread.join(30)

    listed.set()
    first, served = start()  # no view yet: from the store, which it saves
    assert first == A
    served.confirmed()  # type: ignore[attr-defined]
    fetched_for_recovery()

    listed.clear()
    asked.clear()
    calls.clear()
    second, served = start()
    assert second == A
    assert asked.wait(10) and "list states/" not in calls  # the listing is under way, not waited for
    listed.set()
    served.confirmed()  # type: ignore[attr-defined]
    fetched_for_recovery()  # it has nothing to fetch: counted too
    assert sorted(calls) == ["list states/", "read CONFIG"]  # the check, and nothing else (all cached)

    kept = view_path(str(tmp_path / "cache" / "kloset-blocks"), parse_location(location).display)
    before_b = kept.read_text()
    s3.client().fput_object("lastview", f"p/{B_STATE}", str(src / B_STATE))  # B's backup lands
    stale, served = start()
    assert stale == A  # what the view says, until checked
    with pytest.raises(StaleView) as changed:
        served.confirmed()  # type: ignore[attr-defined]
    calls.clear()
    served = prepare(location, "latest", pgdata=True, fresh_view=changed.value.view)
    assert served.snapshot_id == B  # on the store as the check saw it: no listing again
    assert "list states/" not in calls and "read CONFIG" not in calls
    served.confirmed()
    # A named by its id: B's state only adds (blobs, another snapshot), so A is served the same.
    kept.write_text(before_b)
    served = prepare(location, A[:8], pgdata=True, from_last_view=True)
    assert served.snapshot_id == A
    served.confirmed()
    assert B_STATE in kept.read_text()  # the store's view now, for the next start
    fresh, served = start(from_last_view=False)
    assert fresh == B
    again, served = start()  # the view saved by the fresh start
    assert again == B
    served.confirmed()  # type: ignore[attr-defined]

    kept.write_text("{")  # damaged
    calls.clear()
    damaged, served = start()
    assert damaged == B
    assert served.confirmation is None  # type: ignore[attr-defined]  # opened from the store itself
