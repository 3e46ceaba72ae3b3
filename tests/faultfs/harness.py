"""Shared by the tests here: the broker process (`Broker`) and the generated gRPC code
(`grpc_modules`). The faultfs mount is the `faultfs` fixture in conftest.py."""

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

ROOT = Path(__file__).resolve().parents[2]
BINARY = os.environ.get("SWITCHBOARD_BIN", str(ROOT / "target" / "debug" / "switchboard"))
HERE = Path(__file__).resolve().parent
ADDRESS = "fsync.orders"


class Broker:
    """`switchboard serve --data-dir DIR [EXTRA...]` on a free port; its log is collected."""

    def __init__(self, data_dir: Path, *extra_args: str) -> None:
        self.proc = subprocess.Popen(
            [BINARY, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), *extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RUST_LOG": "switchboard=info", "NO_COLOR": "1"},
        )
        self.log: list[str] = []
        self.target = None
        assert self.proc.stderr is not None
        # The gRPC listener's line comes first (the console's, with --http-listen, after it).
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

    def wait_log(self, pattern: str, timeout: float = 20) -> re.Match:
        """The first match of `pattern` in the log, waiting for it (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.log):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in the broker's log:\n" + "".join(self.log))
            time.sleep(0.02)

    def http_target(self) -> str:
        """HOST:PORT of the console and /metrics (a broker started with --http-listen)."""
        return self.wait_log(r"console at .* listen=(127\.0\.0\.1:\d+)").group(1)

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


def grpc_modules(out_dir: Path):
    """Generates the Python code for proto/switchboard/v1/broker.proto into `out_dir` (grpcio-tools,
    as examples/python does) and returns (broker_pb2, broker_pb2_grpc)."""
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            "switchboard/v1/broker.proto",
        ]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed with {rc}")
    sys.path.insert(0, str(out_dir))
    from switchboard.v1 import broker_pb2, broker_pb2_grpc

    return broker_pb2, broker_pb2_grpc
