"""Test fixtures: generate the Python code from proto/, start a real broker on a free port."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GEN = HERE / "gen"


def _generate() -> None:
    from grpc_tools import protoc

    GEN.mkdir(exist_ok=True)
    proto_include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"-I{proto_include}",
            f"--python_out={GEN}",
            f"--grpc_python_out={GEN}",
            "switchboard/v1/broker.proto",
        ]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed with {rc}")
    sys.path.insert(0, str(GEN))


_generate()


def _binary() -> str:
    """The broker the tests start: $SWITCHBOARD_BIN, else the newer of target/release and
    target/debug (so a stale build of one profile is never picked over a fresh one)."""
    if "SWITCHBOARD_BIN" in os.environ:
        return os.environ["SWITCHBOARD_BIN"]
    built = [p for p in (ROOT / "target" / d / "switchboard" for d in ("release", "debug")) if p.exists()]
    if not built:
        raise RuntimeError(
            "no broker binary: run `cargo build --release` (or `cargo build`) in the repository "
            "root, or set SWITCHBOARD_BIN"
        )
    return str(max(built, key=lambda p: p.stat().st_mtime))


BINARY = _binary()


@pytest.fixture
def switchboard_bin() -> str:
    """The broker binary the tests run (also the `switchboard` of the README's CLI session)."""
    return BINARY


class Broker:
    """A switchboard process on 127.0.0.1 with a free port, stopped (SIGTERM) at the end."""

    def __init__(self, *extra_args: str) -> None:
        self.proc = subprocess.Popen(
            [BINARY, "serve", "--listen", "127.0.0.1:0", *extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RUST_LOG": "switchboard=info"},
        )
        self.target = None
        assert self.proc.stderr is not None
        # The start-up line says where it listens; read until it appears (or the process dies).
        for line in self.proc.stderr:
            m = re.search(r"listen=(127\.0\.0\.1:\d+)", line)
            if m:
                self.target = m.group(1)
                break
        if self.target is None:
            self.proc.kill()
            raise RuntimeError("broker did not report its listen address")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture
def secure_broker(tmp_path):
    """A broker with TLS (certificates made by trustme for 127.0.0.1 and localhost) and an
    auth file with one principal, "orders-service" (send orders.>, receive orders.*).
    Yields (broker, ca_pem_path, token)."""
    import hashlib
    import secrets

    import trustme

    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    server_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    for extra in server_cert.cert_chain_pems[1:]:
        with open(tmp_path / "server.pem", "ab") as f:
            f.write(extra.bytes())
    server_cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    token = secrets.token_urlsafe(32)
    (tmp_path / "auth.toml").write_text(
        "[[principal]]\n"
        'name = "orders-service"\n'
        f'token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
        'send = ["orders.>"]\n'
        'receive = ["orders.*"]\n'
    )
    b = Broker(
        "--tls-cert", str(tmp_path / "server.pem"),
        "--tls-key", str(tmp_path / "server.key"),
        "--auth-file", str(tmp_path / "auth.toml"),
    )
    yield b, ca_pem, token
    assert b.stop() == 0, "broker exits 0 on SIGTERM"


@pytest.fixture
def broker():
    b = Broker()
    yield b
    assert b.stop() == 0, "broker exits 0 on SIGTERM"
