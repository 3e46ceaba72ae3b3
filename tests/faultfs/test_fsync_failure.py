"""The disk engine when fsync fails (PostgreSQL's "fsyncgate"): a broker with --data-dir on a
FUSE filesystem (faultfs.py) whose fsync answers EIO and drops the unsynced data while a control
file exists. Needs root and /dev/fuse (CI runs as root); `.ci/run` installs libfuse2 and fusepy.

What must hold: the Send whose fsync failed gets UNAVAILABLE "storage: ... fsync failed" and its
message is never visible (not to a subscriber, not after a restart); reads keep working; the
address's log is reopened and verified before its next write, and Sends succeed again once
fsync works; after a SIGKILL and a restart every acknowledged message is there, byte for byte.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY = os.environ.get("SWITCHBOARD_BIN", str(ROOT / "target" / "debug" / "switchboard"))
HERE = Path(__file__).resolve().parent
ADDRESS = "fsync.orders"


@pytest.fixture
def faultfs(tmp_path):
    """Mounts faultfs at tmp/mnt over tmp/backing; yields (mountpoint, control file)."""
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
    subprocess.run(["umount", str(mnt)], check=False, timeout=20)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


class Broker:
    """`switchboard serve --data-dir DIR` on a free port; its log is collected."""

    def __init__(self, data_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [BINARY, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RUST_LOG": "switchboard=info", "NO_COLOR": "1"},
        )
        self.log: list[str] = []
        self.target = None
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if m := re.search(r"listen=(127\.0\.0\.1:\d+)", line):
                self.target = m.group(1)
                break
        if self.target is None:
            self.proc.kill()
            raise RuntimeError("broker did not start: " + "".join(self.log))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BINARY, *args, "--server", f"http://{self.target}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=check,
        )

    def send(self, payload: str) -> subprocess.CompletedProcess:
        return self.cli("send", ADDRESS, payload, check=False)

    def read_all(self, count: int) -> list[tuple[int, str]]:
        out = self.cli("subscribe", ADDRESS, "--from", "1", "--count", str(count), "--json").stdout
        return [
            (m["sequence"], base64.b64decode(m["payload"]).decode())
            for m in map(json.loads, out.splitlines())
        ]

    def last_sequence(self) -> int:
        return json.loads(self.cli("inspect", ADDRESS, "--json").stdout)["last_sequence"]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=20)
        self.reader.join(timeout=20)


def test_a_failed_fsync_fails_the_send_and_loses_nothing_acknowledged(faultfs) -> None:
    mnt, control = faultfs
    data = mnt / "data"
    broker = Broker(data)
    acknowledged: dict[int, str] = {}
    try:
        for p in ("order-1", "order-2"):
            r = broker.send(p)
            assert r.returncode == 0, r.stderr
            acknowledged[int(r.stdout.strip())] = p
        assert sorted(acknowledged) == [1, 2]

        # fsync fails: the Send is refused with UNAVAILABLE naming storage and fsync.
        control.touch()
        r = broker.send("order-lost")
        assert r.returncode == 1, r.stdout
        assert "UNAVAILABLE" in r.stderr and "storage" in r.stderr and "fsync" in r.stderr, r.stderr
        assert "EIO" in Path(str(control) + ".log").read_text()
        # Nothing of it is visible; reads keep working while fsync is still failing.
        assert broker.last_sequence() == 2
        assert broker.read_all(2) == [(1, "order-1"), (2, "order-2")]
        # A second failure in a row: refused again, not retried as if the data were safe.
        r = broker.send("order-lost-again")
        assert r.returncode == 1 and "UNAVAILABLE" in r.stderr, r.stderr

        # fsync works again: the log is reopened and verified, and Sends succeed.
        control.unlink()
        for p in ("order-3", "order-4"):
            r = broker.send(p)
            assert r.returncode == 0, r.stderr
            acknowledged[int(r.stdout.strip())] = p
        assert any("reopened and verified after a failed fsync" in line for line in broker.log), "".join(broker.log)
        assert any("fsync failed" in line for line in broker.log)
        expected = sorted(acknowledged.items())
        assert broker.read_all(len(expected)) == expected
    finally:
        broker.kill()

    # After a SIGKILL, every acknowledged message is there, byte for byte, and nothing else.
    broker = Broker(data)
    try:
        assert broker.last_sequence() == max(acknowledged)
        assert broker.read_all(len(acknowledged)) == sorted(acknowledged.items())
        assert all("lost" not in p for _, p in broker.read_all(len(acknowledged)))
        r = broker.send("order-after-restart")
        assert r.returncode == 0, r.stderr
        assert int(r.stdout.strip()) == max(acknowledged) + 1
    finally:
        broker.kill()
