"""A worker pool on an acknowledged consumer group: each worker Recvs a batch, processes each
job, and Acks it; a job that fails is Nacked and, after `max_deliveries`, lands in the
dead-letter address. A worker that dies mid-batch loses nothing: its leased jobs go out again
once `ack_wait` passes (SQS / Google Pub/Sub style at-least-once delivery).

The group must exist, with an `ack_wait`, before the workers start (a Recv on a group that
does not exist creates a plain one, without leases). From the repository root, with a broker
running:

    target/release/switchboard group create jobs workers --ack-wait 30s \
        --max-deliveries 3 --dead-letter jobs.dlq

Then, here (code generated into ./gen: README.md beside this file), one worker per terminal:

    PYTHONPATH=gen python worker_pool.py worker 127.0.0.1:50051 jobs workers done.txt

It prints nothing; each processed job's payload is appended to done.txt (one line each).
`--crash-after-batches N` makes the worker kill itself (SIGKILL) in the middle of its Nth
batch, after processing part of it and before acknowledging anything of it.
"""

from __future__ import annotations

import argparse
import os
import signal

from switchboard_client import Switchboard

POISON = b"poison"


def process(payload: bytes) -> None:
    """The work: here, refuse the poison job."""
    if payload == POISON:
        raise ValueError("cannot process this job")


def run_worker(target: str, address: str, group: str, done_path: str, crash_after: int) -> None:
    sb = Switchboard(target)
    batches = 0
    with open(done_path, "a", buffering=1) as done:
        while True:
            messages, _ = sb.recv(address, group, max_messages=10, wait_s=1.0)
            if not messages:
                continue
            batches += 1
            acked = []
            for i, m in enumerate(messages):
                if batches == crash_after and i == len(messages) // 2:
                    # Killed mid-batch: nothing of this batch is acknowledged.
                    done.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                try:
                    process(m.payload)
                except ValueError:
                    sb.nack(address, group, [m.sequence])
                    continue
                done.write(m.payload.decode() + "\n")
                acked.append(m.sequence)
            if acked:
                sb.ack(address, group, acked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run one worker until killed")
    worker.add_argument("target")
    worker.add_argument("address")
    worker.add_argument("group")
    worker.add_argument("done_path")
    worker.add_argument("--crash-after-batches", type=int, default=0)
    args = parser.parse_args()
    run_worker(args.target, args.address, args.group, args.done_path, args.crash_after_batches)


if __name__ == "__main__":
    main()
