"""SendStream's read-ahead on a slow disk is bounded by the read budget (--max-read-buffer-bytes),
not only by its 1,024 requests (SEND_STREAM_IN_FLIGHT). A broker with --data-dir on faultfs.py
in hold mode (every fsync blocks while CONTROL + ".hold" exists) gets one SendStream of 200
distinct 1 MiB messages. Before the budget charged read-ahead requests, the stream read all 200
ahead of their fsync (1,024 would have fit), ~200 MiB held in the broker.

What must hold while fsync is held: the gauge switchboard_read_buffer_bytes stays within the
8 MiB budget; the client's request iterator is stopped (HTTP/2 flow control) after about the
budget's worth of messages plus the transport's windows, not 200; the broker's RSS grows by
much less than the 200 MiB the stream offers. Once fsync works again: all 200 are acknowledged,
sequences 1..200 in order, no error, and the gauge is back to 0. Takes ~5 s; every wait is
bounded (at most ~50 s in all).
"""

from __future__ import annotations

import threading
import time
import urllib.request

from harness import Broker, grpc_modules

MIB = 1024 * 1024
BUDGET = 8 * MIB
COUNT = 200
ADDRESS = "slow.disk"

# Requests the client's iterator can have yielded while the broker reads no more: 8 read by the
# broker (the budget holds 7 whole ones, each 1 MiB plus a few bytes of address and framing; the
# 8th is read and waits for the rest of the budget); 1 more in HTTP/2 flow control (hyper's
# 1 MiB stream and connection windows, tonic's defaults, hold at most one 1 MiB message unread);
# 1 more generated, that grpcio's sending thread holds until the transport takes it (it asks
# the iterator for the next only then). 10, and 2 of slack: at most 12 of the 200 (seen: 9).
MAX_YIELDED = 12
# RSS growth while held: those ~10 messages, each held a few times over (gRPC decode buffer,
# the flusher's queued record, h2 chunks) plus allocator slack. Reading 200 ahead is >= 200 MiB.
MAX_RSS_GROWTH = 64 * MIB


def metric(http: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_send_stream_on_a_slow_disk_reads_ahead_only_the_read_budget(faultfs, tmp_path) -> None:
    import grpc

    pb2, pb2_grpc = grpc_modules(tmp_path)
    mnt, control = faultfs
    hold = control.with_name(control.name + ".hold")
    fsync_log = control.with_name(control.name + ".log")
    broker = Broker(
        mnt / "data",
        "--max-message-bytes", str(MIB),
        "--max-read-buffer-bytes", str(BUDGET),
        "--http-listen", "127.0.0.1:0",
    )
    http = broker.http_target()
    channel = grpc.insecure_channel(broker.target)
    try:
        stub = pb2_grpc.BrokerStub(channel)
        grpc.channel_ready_future(channel).result(timeout=10)
        assert metric(http, "switchboard_read_buffer_bytes") == 0
        rss_before = rss(broker.proc.pid)
        hold.touch()

        yielded = 0

        def requests():
            # Lazily: 1 MiB each, distinct (its index repeated), never more than one alive here.
            nonlocal yielded
            for i in range(COUNT):
                yielded += 1
                yield pb2.SendRequest(address=ADDRESS, payload=i.to_bytes(8, "big") * (MIB // 8))

        responses: list = []
        failure: list[BaseException] = []

        def stream() -> None:
            try:
                for r in stub.SendStream(requests(), timeout=45):
                    responses.append(r)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                failure.append(e)

        sender = threading.Thread(target=stream, daemon=True)
        sender.start()

        # Wait until the broker reads no more: fsync is held, the budget is (nearly) spent and
        # the iterator has yielded nothing new for 1 s (a stop has no signal of its own).
        deadline = time.monotonic() + 20
        peak_rss, gauge, last, since = rss_before, 0.0, -1, time.monotonic()
        while True:
            assert not failure, failure
            assert not responses, "a response came while fsync was held"
            gauge = metric(http, "switchboard_read_buffer_bytes")
            peak_rss = max(peak_rss, rss(broker.proc.pid))
            assert gauge <= BUDGET, f"gauge {gauge} above the {BUDGET}-byte budget"
            if yielded != last:
                last, since = yielded, time.monotonic()
            held = fsync_log.exists() and "HOLD" in fsync_log.read_text()
            if held and gauge >= BUDGET - 2 * MIB and time.monotonic() - since >= 1.0:
                break
            assert time.monotonic() < deadline, (
                f"the broker did not stop reading: gauge={gauge} yielded={yielded} held={held}"
            )
            time.sleep(0.05)
        peak_rss = max(peak_rss, rss(broker.proc.pid))
        growth = peak_rss - rss_before
        print(
            f"held: gauge={gauge / MIB:.2f} MiB yielded={yielded} "
            f"rss {rss_before / MIB:.1f} -> peak {peak_rss / MIB:.1f} MiB (+{growth / MIB:.1f})"
        )
        assert gauge <= BUDGET
        assert yielded <= MAX_YIELDED, f"read {yielded} requests ahead, at most {MAX_YIELDED} fit"
        assert growth < MAX_RSS_GROWTH, f"RSS grew {growth / MIB:.1f} MiB while fsync was held"

        # fsync works again: every message is acknowledged, in order, and the budget is free.
        hold.unlink()
        sender.join(timeout=25)
        assert not sender.is_alive(), f"SendStream still open: {len(responses)} responses"
        assert not failure, failure
        assert [r.sequence for r in responses] == list(range(1, COUNT + 1))
        assert not any(r.HasField("error") or r.duplicate for r in responses)
        assert yielded == COUNT
        deadline = time.monotonic() + 5
        while (gauge := metric(http, "switchboard_read_buffer_bytes")) != 0:
            assert time.monotonic() < deadline, f"gauge stayed at {gauge} after the stream ended"
            time.sleep(0.05)
        assert "RELEASE" in fsync_log.read_text()
    finally:
        hold.unlink(missing_ok=True)
        channel.close()
        broker.kill()
