# The filesystem check before a kept overlay is mounted again. A run that ended in a fault (the
# disk holding the overlay full, qemu-storage-daemon or the host killed) leaves the overlay's ext4
# as a crash leaves a disk: `e2fsck -p` on the attached device replays its journal (kloset-blocks
# gives a kept overlay's filesystem one) and fixes what preen mode may fix; anything else stops the
# run with one line saying what to do, instead of a kernel mount of a corrupt filesystem.
#
# Invariant: only the attached device of a reused overlay is checked (it is ours and not mounted);
# e2fsck writes land in the overlay, never in the backing.
from __future__ import annotations

import subprocess
from pathlib import Path

from kloset_blocks.host.progress import Progress
from kloset_blocks.host.tools import AttachError, last_line

# e2fsck(8) exit status bits.
FSCK_OK = 0
FSCK_CORRECTED = 1
FSCK_REBOOT = 2
FSCK_UNCORRECTED = 4
# A full check reads every inode table and directory through the chain: minutes for a large image.
FSCK_TIMEOUT = 1800.0


def check_kept_overlay(device: str, overlay: Path, progress: Progress) -> None:
    """`e2fsck -p DEVICE`; errors it corrected are reported, anything worse is an AttachError."""
    try:
        p = subprocess.run(
            ["e2fsck", "-p", device],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=FSCK_TIMEOUT,
        )
    except FileNotFoundError as e:
        raise AttachError("fsck: e2fsck not found (run `make deps`)") from e
    except subprocess.TimeoutExpired as e:
        raise AttachError(f"fsck: e2fsck on the kept overlay {overlay} did not finish") from e
    said = last_line(p.stdout + "\n" + p.stderr)
    if p.returncode & ~(FSCK_CORRECTED | FSCK_REBOOT) == 0:
        if p.returncode:
            progress.say(f"the kept overlay {overlay} was not cleanly unmounted; e2fsck repaired it: {said}")
        elif "recovering journal" in p.stdout:  # exit 0 after a replay: worth saying all the same
            progress.say(f"the kept overlay {overlay} was not cleanly unmounted; its journal was replayed")
        return
    if p.returncode & FSCK_UNCORRECTED:
        raise AttachError(
            f"fsck: the filesystem in the kept overlay {overlay} is damaged beyond what e2fsck -p "
            f"repairs ({said}); repair it by hand (`e2fsck -f` on it, attached) or remove {overlay} to "
            "start again from the snapshot"
        )
    raise AttachError(f"fsck: e2fsck on the kept overlay {overlay} failed (exit {p.returncode}): {said}")
