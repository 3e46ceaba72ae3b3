"""The Python example client against a freshly started broker."""

from __future__ import annotations

import threading

import grpc
import pytest

from switchboard_client import Switchboard, main


def test_seeds_scenario_one_thread_sends_another_receives(broker):
    sb = Switchboard(broker.target)
    got = {}

    def receive():
        got["result"] = sb.recv("address", wait_s=10)

    receiver = threading.Thread(target=receive)
    receiver.start()
    assert sb.send("address", b"message") == 1
    receiver.join(timeout=20)
    messages, dropped = got["result"]
    assert [(m.address, m.sequence, m.payload) for m in messages] == [("address", 1, b"message")]
    assert dropped == 0
    sb.close()


def test_fan_out_to_two_subscribers(broker):
    sb = Switchboard(broker.target)
    streams = [sb.subscribe("py.news"), sb.subscribe("py.news")]
    for i in range(5):
        sb.send("py.news", f"n{i}".encode())
    for stream in streams:
        it = iter(stream)
        seen = [next(it).message for _ in range(5)]
        assert [(m.sequence, m.payload) for m in seen] == [(i + 1, f"n{i}".encode()) for i in range(5)]
        stream.cancel()
    sb.close()


def test_consumer_group_splits_messages(broker):
    sb = Switchboard(broker.target)
    sb.recv("py.jobs", group="workers")  # first use creates the group at the current end
    for i in range(20):
        sb.send("py.jobs", str(i).encode())
    a, _ = sb.recv("py.jobs", group="workers", max_messages=7)
    b, _ = sb.recv("py.jobs", group="workers", max_messages=100)
    assert len(a) == 7 and len(b) == 13
    assert sorted(m.sequence for m in a + b) == list(range(1, 21))
    assert set(m.sequence for m in a).isdisjoint(m.sequence for m in b)
    # Another group sees nothing of these: it starts after its first use.
    other, _ = sb.recv("py.jobs", group="audit", max_messages=100)
    assert other == []
    sb.close()


def test_empty_address_is_invalid_argument(broker):
    sb = Switchboard(broker.target)
    with pytest.raises(grpc.RpcError) as err:
        sb.send("", b"x")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "address" in err.value.details()
    sb.close()


def test_example_main_runs(broker, capsys):
    main(broker.target)
    out = capsys.readouterr().out
    assert "recv: [(1, b'hello from python')]" in out
    assert "subscribe: 1 b'breaking'" in out
    assert "group: [b'job 0', b'job 1', b'job 2', b'job 3']" in out


def test_batching_publisher_flushes_at_100_messages_or_10_ms(broker):
    from switchboard_client import BatchingPublisher

    sb = Switchboard(broker.target)
    publisher = BatchingPublisher(sb, "py.batched")
    # A lone message goes out after at most ~10 ms, on its own.
    assert publisher.publish(b"first").result(timeout=5) == 1
    assert publisher.batches_sent == 1
    futures = [publisher.publish(f"m{i}".encode()) for i in range(250)]
    assert [f.result(timeout=10) for f in futures] == list(range(2, 252))
    assert publisher.batches_sent < 60, "250 messages went out in batches, not one RPC each"
    publisher.close()
    messages, _ = sb.recv("py.batched", max_messages=1000)
    assert [m.payload for m in messages] == [b"first"] + [f"m{i}".encode() for i in range(250)]
    sb.close()


def test_tls_and_a_bearer_token(secure_broker):
    broker, ca_pem, token = secure_broker
    ca = ca_pem.read_bytes()
    sb = Switchboard(broker.target, root_certificates=ca, token=token)
    assert sb.send("orders.eu", b"secure") == 1
    messages, _ = sb.recv("orders.eu")
    assert [m.payload for m in messages] == [b"secure"]
    with pytest.raises(grpc.RpcError) as denied:
        sb.send("billing.x", b"no")
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "orders-service" in denied.value.details()
    sb.close()
    anonymous = Switchboard(broker.target, root_certificates=ca)
    with pytest.raises(grpc.RpcError) as unauth:
        anonymous.send("orders.eu", b"x")
    assert unauth.value.code() == grpc.StatusCode.UNAUTHENTICATED
    anonymous.close()
