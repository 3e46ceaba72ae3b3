"""A small Python client for switchboard, on code generated from ../../proto.

Generate the code first (the tests do this for you, into ./gen; README.md beside this file
has every step):

    mkdir -p gen
    python -m grpc_tools.protoc -I ../../proto --python_out=gen --grpc_python_out=gen \
        switchboard/v1/broker.proto

Then, with a broker running (`cargo run --release -- serve`):

    PYTHONPATH=gen python switchboard_client.py
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import Future

import grpc
from google.protobuf.duration_pb2 import Duration

from switchboard.v1 import broker_pb2, broker_pb2_grpc


class Switchboard:
    """Send, Recv (long-poll, consumer groups) and Subscribe over one gRPC channel."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        root_certificates: bytes | None = None,
        token: str | None = None,
    ) -> None:
        """Plaintext by default. With `root_certificates` (PEM of the CA that signed the
        broker's certificate) the channel uses TLS; with `token` every call carries
        `authorization: Bearer TOKEN` (brokers with --auth-file)."""
        if root_certificates is not None or token is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            if token is not None:
                credentials = grpc.composite_channel_credentials(
                    credentials, grpc.access_token_call_credentials(token)
                )
            self.channel = grpc.secure_channel(target, credentials)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = broker_pb2_grpc.BrokerStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def send(self, address: str, payload: bytes, headers: dict[str, str] | None = None) -> int:
        """Sends one message; returns its per-address sequence."""
        request = broker_pb2.SendRequest(address=address, payload=payload, headers=headers or {})
        return self.stub.Send(request).sequence

    def recv(self, address: str, group: str = "", max_messages: int = 1, wait_s: float = 0.0):
        """Takes up to `max_messages` from a consumer group, waiting up to `wait_s` seconds.

        Returns (messages, dropped)."""
        wait = Duration()
        wait.FromNanoseconds(int(wait_s * 1e9))
        request = broker_pb2.RecvRequest(
            address=address, group=group, max_messages=max_messages, wait=wait
        )
        response = self.stub.Recv(request, timeout=wait_s + 10)
        return list(response.messages), response.dropped

    def create_group(
        self,
        address: str,
        group: str,
        start_sequence: int = 0,
        ack_wait_s: float = 0.0,
        max_deliveries: int = 0,
        dead_letter_address: str = "",
        max_ack_pending: int = 0,
    ):
        """Creates a named consumer group (idempotent). With `ack_wait_s`, every message handed
        out is leased and handed out again unless acknowledged. Returns (created, next_sequence)."""
        ack_wait = Duration()
        ack_wait.FromNanoseconds(int(ack_wait_s * 1e9))
        request = broker_pb2.CreateGroupRequest(
            address=address,
            group=group,
            start_sequence=start_sequence,
            ack_wait=ack_wait,
            max_deliveries=max_deliveries,
            dead_letter_address=dead_letter_address,
            max_ack_pending=max_ack_pending,
        )
        response = self.stub.CreateGroup(request)
        return response.created, response.next_sequence

    def ack(self, address: str, group: str, sequences: list[int]) -> list[int]:
        """Acknowledges messages; returns the sequences that were not pending."""
        request = broker_pb2.AckRequest(address=address, group=group, sequences=sequences)
        return list(self.stub.Ack(request).not_pending)

    def nack(self, address: str, group: str, sequences: list[int], delay_s: float = 0.0) -> list[int]:
        """Gives messages back for redelivery after `delay_s`; returns those not pending."""
        delay = Duration()
        delay.FromNanoseconds(int(delay_s * 1e9))
        request = broker_pb2.NackRequest(
            address=address, group=group, sequences=sequences, delay=delay
        )
        return list(self.stub.Nack(request).not_pending)

    def subscribe(self, address: str, group: str = ""):
        """Opens a Subscribe stream and returns it once the broker has registered it.

        Waiting for the response headers (initial metadata) is the signal: every message sent
        after this returns is delivered to the stream. Iterate it for SubscribeResponse events;
        call .cancel() to end it."""
        call = self.stub.Subscribe(broker_pb2.SubscribeRequest(address=address, group=group))
        call.initial_metadata()
        return call


class BatchingPublisher:
    """Publishes to one address in batches (SendBatch): a batch goes out when it holds 100
    messages or its oldest message has waited 10 ms, as Google's Pub/Sub clients do.
    `publish` returns a Future that resolves to the message's sequence (or raises the
    batch's error). Call `close()` to flush and stop."""

    MAX_MESSAGES = 100
    MAX_DELAY_S = 0.010

    def __init__(self, client: "Switchboard", address: str) -> None:
        self.client = client
        self.address = address
        self.batches_sent = 0
        self._pending: list[tuple[broker_pb2.BatchMessage, Future]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def publish(self, payload: bytes, headers: dict[str, str] | None = None, message_id: str = "") -> Future:
        future: Future = Future()
        message = broker_pb2.BatchMessage(payload=payload, headers=headers or {}, message_id=message_id)
        with self._cond:
            if self._closed:
                raise RuntimeError("publisher closed")
            self._pending.append((message, future))
            if len(self._pending) == 1 or len(self._pending) >= self.MAX_MESSAGES:
                self._cond.notify()
        return future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending and self._closed:
                    return
                deadline = time.monotonic() + self.MAX_DELAY_S
                while len(self._pending) < self.MAX_MESSAGES and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._pending[: self.MAX_MESSAGES]
                del self._pending[: self.MAX_MESSAGES]
            self._send(batch)

    def _send(self, batch) -> None:
        request = broker_pb2.SendBatchRequest(address=self.address, messages=[m for m, _ in batch])
        try:
            response = self.client.stub.SendBatch(request)
        except grpc.RpcError as e:
            for _, future in batch:
                future.set_exception(e)
            return
        self.batches_sent += 1
        for (_, future), result in zip(batch, response.results):
            future.set_result(result.sequence)


def main(target: str) -> None:
    sb = Switchboard(target)
    # Send and Recv with a wait: the receiver waits until the message arrives.
    result = {}
    receiver = threading.Thread(
        target=lambda: result.update(got=sb.recv("demo.mailbox", wait_s=5)), daemon=True
    )
    receiver.start()
    sb.send("demo.mailbox", b"hello from python", {"lang": "py"})
    receiver.join()
    messages, _ = result["got"]
    print("recv:", [(m.sequence, m.payload) for m in messages])

    # Subscribe (fan-out): every message sent after the stream is registered.
    stream = sb.subscribe("demo.news")
    sb.send("demo.news", b"breaking")
    event = next(iter(stream))
    print("subscribe:", event.message.sequence, event.message.payload)
    stream.cancel()

    # A consumer group: workers share the messages, each taken exactly once.
    sb.recv("demo.jobs", group="workers")  # first use creates the group
    for i in range(4):
        sb.send("demo.jobs", f"job {i}".encode())
    jobs, _ = sb.recv("demo.jobs", group="workers", max_messages=10)
    print("group:", [m.payload for m in jobs])
    sb.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051")
