"""A FUSE passthrough filesystem whose fsync can be made to fail: the disk engine's failed-fsync
test (test_fsync_failure.py) runs a broker on it.

    python faultfs.py BACKING MOUNTPOINT CONTROL

mirrors BACKING at MOUNTPOINT. While the file CONTROL (outside the mount) exists, every
fsync / fdatasync answers EIO, and, like a real disk whose write-back failed, the data written
since the file's last good fsync is thrown away (the backing file is cut back to its length at
that fsync), so a broker that retried the fsync and carried on would lose it. Each failed fsync
appends a line to CONTROL + ".log". Runs in the foreground until unmounted.

Hold mode (a slow disk): while the file CONTROL + ".hold" exists, every fsync / fdatasync
blocks instead, polling for the file every 10 ms, until the file is removed (then the fsync goes
on as usual: EIO if CONTROL exists, else a real fsync) or, so that a test that forgets to remove
it cannot hang the mount, for at most HOLD_LIMIT_S (60 s). Other operations (reads, writes,
renames) are not held. Each held fsync appends "HOLD path" to CONTROL + ".log" when it starts
holding and "RELEASE path after N s" when it stops.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time

from fuse import FUSE, FuseOSError, Operations  # fusepy

# Longest an fsync is held in hold mode, seconds.
HOLD_LIMIT_S = 60.0


class FaultFs(Operations):
    def __init__(self, root: str, control: str) -> None:
        self.root = os.path.realpath(root)
        self.control = control
        self.hold = control + ".hold"
        self.mutex = threading.Lock()
        # Backing path -> its length at its last successful fsync.
        self.synced: dict[str, int] = {}

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    # Metadata -----------------------------------------------------------------------------
    def access(self, path, mode):
        if not os.access(self._full(path), mode):
            raise FuseOSError(errno.EACCES)

    def getattr(self, path, fh=None):
        st = os.lstat(self._full(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
        return {k: getattr(st, k) for k in keys}

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._full(path))]

    def mkdir(self, path, mode):
        os.mkdir(self._full(path), mode)

    def rmdir(self, path):
        os.rmdir(self._full(path))

    def unlink(self, path):
        full = self._full(path)
        os.unlink(full)
        self.synced.pop(full, None)

    def rename(self, old, new):
        os.rename(self._full(old), self._full(new))
        with self.mutex:
            if self._full(old) in self.synced:
                self.synced[self._full(new)] = self.synced.pop(self._full(old))

    def chmod(self, path, mode):
        os.chmod(self._full(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._full(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._full(path), times)

    def statfs(self, path):
        st = os.statvfs(self._full(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")
        return {k: getattr(st, k) for k in keys}

    def truncate(self, path, length, fh=None):
        with open(self._full(path), "r+b") as f:
            f.truncate(length)

    # Files --------------------------------------------------------------------------------
    def open(self, path, flags):
        return os.open(self._full(path), flags)

    def create(self, path, mode, fi=None):
        return os.open(self._full(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path, length, offset, fh):
        return os.pread(fh, length, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0

    def _log(self, line: str) -> None:
        with self.mutex, open(self.control + ".log", "a") as log:
            log.write(line + "\n")

    def _hold_while_asked(self, path: str) -> None:
        """Hold mode: blocks while the hold file exists (at most HOLD_LIMIT_S). Not under
        self.mutex, so held fsyncs do not hold up each other or rename/unlink."""
        if not os.path.exists(self.hold):
            return
        start = time.monotonic()
        self._log(f"HOLD {path}")
        while os.path.exists(self.hold) and time.monotonic() - start < HOLD_LIMIT_S:
            time.sleep(0.01)
        self._log(f"RELEASE {path} after {time.monotonic() - start:.2f} s")

    def fsync(self, path, datasync, fh):
        self._hold_while_asked(path)
        full = self._full(path)
        with self.mutex:
            if os.path.exists(self.control):
                # The write-back failed: what was written since the last good fsync is gone.
                keep = self.synced.get(full, 0)
                size = os.fstat(fh).st_size
                if size > keep:
                    os.ftruncate(fh, keep)
                with open(self.control + ".log", "a") as log:
                    log.write(f"EIO {path} cut {size - keep} bytes\n")
                raise FuseOSError(errno.EIO)
            if datasync:
                os.fdatasync(fh)
            else:
                os.fsync(fh)
            self.synced[full] = os.fstat(fh).st_size
        return 0

    def fsyncdir(self, path, datasync, fh):
        return 0


def main() -> None:
    backing, mountpoint, control = sys.argv[1:4]
    FUSE(FaultFs(backing, control), mountpoint, foreground=True, nothreads=False)


if __name__ == "__main__":
    main()
