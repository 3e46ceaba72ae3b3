"""The disk engine when fsync fails (PostgreSQL's "fsyncgate"): a broker with --data-dir on a
FUSE filesystem (faultfs.py) whose fsync answers EIO and drops the unsynced data while a control
file exists. Needs root and /dev/fuse (CI runs as root); `.ci/run` installs libfuse2 and fusepy.

What must hold: the Send whose fsync failed gets UNAVAILABLE "storage: ... fsync failed" and its
message is never visible (not to a subscriber, not after a restart); reads keep working; the
address's log is reopened and verified before its next write, and Sends succeed again once
fsync works; after a SIGKILL and a restart every acknowledged message is there, byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from harness import Broker


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
