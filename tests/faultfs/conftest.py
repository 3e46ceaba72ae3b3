"""The `faultfs` fixture: faultfs.py mounted over a temporary directory (needs root and
/dev/fuse). Helpers shared by the tests are in harness.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from harness import HERE


@pytest.fixture
def faultfs(tmp_path):
    """Mounts faultfs at tmp/mnt over tmp/backing; yields (mountpoint, control file). The hold
    file (control + ".hold") is removed before unmounting, so no fsync is left held."""
    backing, mnt, control = tmp_path / "backing", tmp_path / "mnt", tmp_path / "fail-fsync"
    backing.mkdir()
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "faultfs.py"), str(backing), str(mnt), str(control)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # FUSE gives no signal when the mount is ready; poll for it, bounded.
    deadline = time.monotonic() + 20
    while not os.path.ismount(mnt):
        if proc.poll() is not None:
            raise RuntimeError(f"faultfs exited: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("faultfs did not mount within 20 s")
        time.sleep(0.02)
    yield mnt, control
    for f in (control, control.with_name(control.name + ".hold")):
        f.unlink(missing_ok=True)
    subprocess.run(["umount", str(mnt)], check=False, timeout=20)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
