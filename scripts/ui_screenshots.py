"""Screenshots of `kloset-blocks ui`'s main views for the README, from the golden-plain fixture.

    sudo .venv/bin/python scripts/ui_screenshots.py [STORE] [OUTDIR]

Starts the real command (private run root), drives Debian's chromium through Playwright, writes
docs/ui-*.png, then stops the server (SIGTERM: every chain torn down).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from kloset_blocks.web.launch import REPO, spawn

A, B = "bf6afbae", "3b116f40"
ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def main() -> int:
    store = sys.argv[1] if len(sys.argv) > 1 else str(REPO.parent / "shared" / "fixtures" / "golden-plain")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else REPO / "docs")
    root = Path(tempfile.mkdtemp(prefix="kb-ui-shots-", dir="/run"))
    os.chmod(root, 0o711)
    proc, url = spawn(store, root, "-q")
    base = url.split("/?", 1)[0]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.set_default_timeout(120_000)
            page.goto(url)
            page.locator("main table a").first.wait_for()

            page.get_by_role("link", name=A, exact=True).click()
            page.get_by_label("Database").wait_for()
            page.get_by_role("link", name="customers", exact=True).wait_for()
            page.get_by_role("textbox", name="SQL").fill(
                "SELECT id, name, email\nFROM customers\nWHERE id BETWEEN 148 AND 152\nORDER BY id"
            )
            page.keyboard.press("Escape")  # the completion popup
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("5 row(s)").wait_for()
            page.get_by_role("button", name="as INSERT").click()
            page.screenshot(path=out / "ui-snapshot.png", full_page=True)

            page.get_by_role("link", name="pgbench_accounts", exact=True).click()
            page.get_by_role("button", name="Next page").wait_for()
            page.screenshot(path=out / "ui-table.png")

            page.goto(f"{base}/#/across")
            page.get_by_label("Database").fill("shop")
            page.get_by_role("textbox", name="SQL").fill(
                "SELECT id, name, email FROM customers WHERE id BETWEEN 149 AND 151"
            )
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("2 of 2 snapshot(s)").wait_for()
            expect(page.locator("main p[role=status]")).not_to_contain_text("running")
            page.screenshot(path=out / "ui-across.png", full_page=True)

            page.goto(f"{base}/#/diff")
            page.get_by_label("Database").fill("shop")
            page.get_by_label("Table").fill("public.pgbench_accounts")
            page.get_by_role("button", name="Compare").click()
            page.get_by_text("10 changed").wait_for()
            page.screenshot(path=out / "ui-diff.png")

            page.goto(f"{base}/#/")
            page.get_by_text("ready").first.wait_for()
            page.set_viewport_size({"width": 1280, "height": 240})
            page.screenshot(path=out / "ui-backups.png")
            browser.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        os.rmdir(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
