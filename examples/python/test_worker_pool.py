"""The worker pool example against a fresh broker: three worker processes, one killed mid-batch
(SIGKILL); every job is processed at least once and the poison job lands in the dead-letter
address with the four dead-letter headers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from switchboard_client import Switchboard

HERE = Path(__file__).resolve().parent
JOBS = 300


def test_worker_pool_survives_a_killed_worker_and_dead_letters_the_poison(broker, tmp_path):
    sb = Switchboard(broker.target)
    created, _ = sb.create_group(
        "jobs", "workers", ack_wait_s=1.0, max_deliveries=3, dead_letter_address="jobs.dlq"
    )
    assert created
    for i in range(JOBS):
        sb.send("jobs", f"job-{i}".encode())
        if i == JOBS // 2:
            sb.send("jobs", b"poison")
    env = {**os.environ, "PYTHONPATH": f"{HERE / 'gen'}{os.pathsep}{HERE}"}
    def start(w: int, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(HERE / "worker_pool.py"), "worker", broker.target, "jobs",
             "workers", str(tmp_path / f"done-{w}.txt"), *extra],
            env=env,
        )

    # Worker 0 runs alone first, so it surely takes a batch, and is killed in the middle of it.
    workers = [start(0, "--crash-after-batches", "1")]
    try:
        assert workers[0].wait(timeout=30) == -9, "worker 0 was killed mid-batch"
        killed_done = (tmp_path / "done-0.txt").read_text().split()
        assert 0 < len(killed_done) < 10, "it processed part of its batch, acked none"
        workers += [start(1), start(2)]
        deadline = time.monotonic() + 60
        want = {f"job-{i}" for i in range(JOBS)}
        dead = []
        while time.monotonic() < deadline:
            done = set()
            for w in range(3):
                path = tmp_path / f"done-{w}.txt"
                if path.exists():
                    done |= set(path.read_text().split())
            if not dead:
                dead, _ = sb.recv("jobs.dlq", max_messages=10)
            if done >= want and dead:
                break
            time.sleep(0.2)
        missing = want - done
        assert not missing, f"{len(missing)} jobs never processed, e.g. {sorted(missing)[:5]}"
        assert "poison" not in done
        # The killed worker's jobs were never acknowledged: the others processed them again.
        survivors = set()
        for w in (1, 2):
            path = tmp_path / f"done-{w}.txt"
            if path.exists():
                survivors |= set(path.read_text().split())
        assert set(killed_done) <= survivors
        assert len(dead) == 1
        d = dead[0]
        assert d.payload == b"poison"
        assert d.headers["switchboard-dead-letter-address"] == "jobs"
        assert d.headers["switchboard-dead-letter-group"] == "workers"
        assert d.headers["switchboard-dead-letter-sequence"] == str(JOBS // 2 + 2)
        assert d.headers["switchboard-dead-letter-deliveries"] == "3"
    finally:
        for p in workers:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)
        sb.close()
