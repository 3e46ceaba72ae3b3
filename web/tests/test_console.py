"""The web console in a real browser: Debian's chromium driven by Playwright, against a fresh
broker started with `--http-listen`. Screenshots go to target/console-screenshots/."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
BINARY = os.environ.get("SWITCHBOARD_BIN", str(ROOT / "target" / "debug" / "switchboard"))
SHOTS = ROOT / "target" / "console-screenshots"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Chromium's own background traffic is refused on a closed network; these flags stop it.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Broker:
    """`switchboard serve` on free loopback ports with the console on; SIGTERM at the end."""

    def __init__(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [BINARY, "serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RUST_LOG": "switchboard=info", "NO_COLOR": "1"},
        )
        self.grpc = self.console = None
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if self.grpc is None and (m := re.search(r"listen=(127\.0\.0\.1:\d+)", line)):
                self.grpc = m.group(1)
            if m := re.search(r"console at (http://127\.0\.0\.1:\d+/)", line):
                self.console = m.group(1)
                break
        if self.grpc is None or self.console is None:
            self.proc.kill()
            raise RuntimeError("broker did not report its listeners")
        # Keep reading its log so the pipe never fills.
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def cli(self, *args: str, token: str | None = None) -> str:
        extra = ["--token", token] if token else []
        out = subprocess.run(
            [BINARY, *args, "--server", f"http://{self.grpc}", *extra],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout

    def stop(self) -> None:
        self.proc.terminate()
        try:
            assert self.proc.wait(timeout=10) == 0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture
def broker():
    b = Broker()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"the page threw: {errors}"


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=False)


def open_address(page: Page, address: str) -> None:
    page.fill("#open-input", address)
    page.click("#open-form button")
    # The tail has read where to start (the address's recent history or its next sequence)
    # and subscribed from there.
    expect(page.locator("#tail")).to_have_attribute("data-from", re.compile(r"^\d+$"))


# Installed before the page's own script runs: records every state the address table's and the
# tail's empty-state lines go through ("<visible text>|rows=<rows shown>", text "" when hidden),
# from the first parse on, so a test can check what the page said before the first answer.
WATCH_EMPTY_STATES = """
(() => {
  const watched = { "addresses-empty": "#addresses-body tr", "tail-empty": "#tail li" };
  window.__states = {};
  for (const id of Object.keys(watched)) window.__states[id] = [];
  const note = () => {
    for (const [id, rows] of Object.entries(watched)) {
      const el = document.getElementById(id);
      if (!el) continue;
      const shown = el.hidden || el.closest("[hidden]") ? "" : el.textContent.trim();
      const s = `${shown}|rows=${document.querySelectorAll(rows).length}`;
      const log = window.__states[id];
      if (log[log.length - 1] !== s) log.push(s);
    }
  };
  new MutationObserver(note).observe(document, {
    subtree: true, childList: true, characterData: true, attributes: true,
  });
  document.addEventListener("DOMContentLoaded", note);
})();
"""


def states(page: Page, element_id: str) -> list[str]:
    return page.evaluate(f"window.__states[{element_id!r}]")


def send_lines(broker: "Broker", address: str, lines: list[str]) -> None:
    subprocess.run(
        [BINARY, "send", address, "-", "--lines", "--server", f"http://{broker.grpc}"],
        input="".join(f"{line}\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )


def test_console_publishes_tails_replays_and_shows_group_lag(broker: Broker, page: Page) -> None:
    # The first render settles: no stream is opened until an address is.
    page.goto(broker.console, wait_until="networkidle")
    expect(page.locator("#conn")).to_have_attribute("data-state", "ok")
    expect(page.locator("#addresses-empty")).to_be_visible()

    open_address(page, "console.demo")
    expect(page.locator("#tail-address")).to_have_text("console.demo")
    expect(page.locator("#publish-address")).to_have_value("console.demo")

    # Publish through the form: the result names the sequence, the tail shows the message.
    page.fill("#publish-payload", '{"hello": "from the form"}')
    page.click("details summary")
    page.fill("#publish-headers", "kind: demo")
    page.click("#publish-button")
    expect(page.locator("#publish-result")).to_have_text("sent · sequence 1")
    first = page.locator('#tail li[data-sequence="1"]')
    expect(first).to_contain_text('{"hello": "from the form"}')
    expect(first.locator(".headers")).to_contain_text("kind: demo")

    # A Send from the CLI appears within a second.
    assert broker.cli("send", "console.demo", "from the cli").strip() == "2"
    started = time.monotonic()
    expect(page.locator('#tail li[data-sequence="2"]')).to_contain_text("from the cli", timeout=1000)
    assert time.monotonic() - started < 1.0

    # The address table lists it, with its counts.
    row = page.locator('#addresses-body tr[data-address="console.demo"]')
    expect(row).to_be_visible()
    expect(row.locator("td").nth(1)).to_have_text("2")

    # A group that falls behind shows its lag in the table and on the lag chart.
    assert broker.cli("group", "create", "console.demo", "workers").startswith("created")
    subprocess.run(
        [BINARY, "send", "console.demo", "-", "--lines", "--server", f"http://{broker.grpc}"],
        input="job-1\njob-2\njob-3\n",
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    expect(row.locator('.chip[data-group="workers"]')).to_have_attribute("data-lag", "3", timeout=5000)
    expect(row.locator('.chip[data-group="workers"]')).to_contain_text("workers · 3")
    expect(row.locator('.chip[data-group="workers"]')).to_have_attribute("data-muted", "false")
    # Nobody has read the default group (the tail is fan-out): its lag is shown muted, saying so.
    default_chip = row.locator('.chip[data-group=""]')
    expect(default_chip).to_have_attribute("data-lag", "5")
    expect(default_chip).to_have_attribute("data-muted", "true")
    expect(default_chip).to_have_class(re.compile(r"\bmuted\b"))
    expect(default_chip).to_have_attribute("title", re.compile("nobody reads the default group"))
    expect(page.locator('#groups .group[data-group=""]')).to_have_attribute("data-muted", "true", timeout=5000)
    group_card = page.locator('#groups .group[data-group="workers"]')
    expect(group_card).to_contain_text("lag 3", timeout=5000)
    expect(group_card.locator("svg.spark polyline")).to_have_count(1)
    expect(page.locator('#tail li[data-sequence="5"]')).to_contain_text("job-3")
    # Let the lag chart take a few samples and the rate settle before the screenshot.
    page.wait_for_timeout(2500)
    shot(page, "console-1280x800.png")

    # Once somebody reads the default group, its lag is an ordinary lag again.
    assert broker.cli("recv", "console.demo").strip()
    expect(default_chip).to_have_attribute("data-muted", "false", timeout=5000)
    expect(default_chip).to_have_attribute("data-lag", "4")

    # Replay from sequence 2: the tail is rebuilt from the history.
    page.fill("#replay-from", "2")
    page.click("#replay-form button[type=submit]")
    expect(page.locator("#tail")).to_have_attribute("data-from", "2")
    expect(page.locator("#tail li[data-sequence]")).to_have_count(4)
    expect(page.locator('#tail li[data-sequence="1"]')).to_have_count(0)

    # Hex view.
    page.click("#fmt-hex")
    expect(page.locator('#tail li[data-sequence="2"] pre')).to_have_text(
        " ".join(f"{b:02x}" for b in b"from the cli")
    )
    page.click("#fmt-text")

    # A phone-width view stays readable: one column, no horizontal page scroll.
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(300)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways at phone width ({width}px)"
    shot(page, "console-phone.png")


def test_console_errors_name_the_field(broker: Broker, page: Page) -> None:
    page.goto(broker.console, wait_until="networkidle")
    page.fill("#publish-address", "not valid")
    page.click("#publish-button")
    result = page.locator("#publish-result")
    expect(result).to_contain_text("InvalidArgument")
    expect(result).to_contain_text("address")


def new_principal(name: str, rules: str) -> tuple[str, str]:
    """`switchboard token new NAME`: (the token, its [[principal]] entry with `rules`)."""
    out = subprocess.run(
        [BINARY, "token", "new", name], capture_output=True, text=True, check=True, timeout=20
    ).stdout
    # The token on the first line, then a [[principal]] block with its SHA-256.
    secret = out.splitlines()[0].strip()
    sha = re.search(r"token_sha256\s*=\s*\"([0-9a-f]{64})\"", out)
    assert secret and sha, out
    return secret, f'[[principal]]\nname = "{name}"\ntoken_sha256 = "{sha.group(1)}"\n{rules}\n'


@pytest.fixture
def secure_broker(tmp_path):
    """A broker with an auth file: "operator" may do everything, "publisher" may send to and
    receive from `pub.>` only, without admin. Yields (broker, operator token, publisher token)."""
    operator, op_entry = new_principal("operator", 'send = [">"]\nreceive = [">"]\nadmin = true')
    publisher, pub_entry = new_principal("publisher", 'send = ["pub.>"]\nreceive = ["pub.>"]')
    auth = tmp_path / "auth.toml"
    auth.write_text(op_entry + pub_entry)
    b = Broker("--auth-file", str(auth))
    yield b, operator, publisher
    b.stop()


def use_token(page: Page, token: str) -> None:
    page.fill("#token-input", token)
    page.click("#token-form button[type=submit]")


def test_console_asks_for_a_token_and_keeps_it_for_the_tab(secure_broker, page: Page) -> None:
    broker, operator, _ = secure_broker
    page.goto(broker.console, wait_until="networkidle")
    expect(page.locator("#conn")).to_have_attribute("data-state", "auth")
    expect(page.locator("#token-panel")).to_be_visible()
    expect(page.locator("#token-why")).to_contain_text("credentials")
    shot(page, "console-token.png")
    use_token(page, operator)
    expect(page.locator("#conn")).to_have_attribute("data-state", "ok")
    # Kept in sessionStorage (this tab), never in localStorage.
    assert page.evaluate("sessionStorage.getItem('switchboard.token')") == operator
    assert page.evaluate("localStorage.length") == 0
    open_address(page, "secure.demo")
    page.fill("#publish-payload", "with a token")
    page.click("#publish-button")
    expect(page.locator("#publish-result")).to_have_text("sent · sequence 1")
    expect(page.locator('#tail li[data-sequence="1"]')).to_contain_text("with a token")


def test_console_with_a_token_that_is_not_admin(secure_broker, page: Page) -> None:
    broker, _, publisher = secure_broker
    page.goto(broker.console, wait_until="networkidle")
    use_token(page, publisher)
    expect(page.locator("#conn")).to_have_attribute("data-state", "auth")
    expect(page.locator("#addresses-empty")).to_contain_text("may not list addresses")
    # Its own addresses still work: tail and publish.
    open_address(page, "pub.demo")
    page.fill("#publish-payload", "publisher was here")
    page.click("#publish-button")
    expect(page.locator("#publish-result")).to_have_text("sent · sequence 1")
    # Without admin the live tail starts "from now" (it cannot read the next sequence), so read
    # the message back with a replay, which needs only the receive permission.
    page.fill("#replay-from", "1")
    page.click("#replay-form button[type=submit]")
    expect(page.locator('#tail li[data-sequence="1"]')).to_contain_text("publisher was here")
    # Elsewhere: refused, naming the principal.
    page.fill("#publish-address", "secure.other")
    page.click("#publish-button")
    expect(page.locator("#publish-result")).to_contain_text("PermissionDenied")
    expect(page.locator("#publish-result")).to_contain_text('"publisher"')


def test_console_first_paint_loads_before_it_says_empty(broker: Broker, page: Page) -> None:
    for name in ("paint.a", "paint.b"):
        assert broker.cli("send", name, "hello").strip() == "1"
    page.add_init_script(WATCH_EMPTY_STATES)
    page.goto(broker.console)
    expect(page.locator('#addresses-body tr[data-address="paint.b"]')).to_be_visible()
    expect(page.locator("#addresses-empty")).to_be_hidden()
    seen = states(page, "addresses-empty")
    # Addresses exist: "No addresses yet" is never on the page, and the loading state comes
    # before the list.
    assert not any("No addresses yet" in s for s in seen), seen
    assert seen[0] == "Loading addresses…|rows=0", seen
    assert seen[-1] == "|rows=2", seen


def test_console_says_when_listing_fails(broker: Broker, page: Page) -> None:
    # The ListAddresses call fails: an error, not "No addresses yet".
    page.route("**/switchboard.v1.Admin/ListAddresses", lambda route: route.fulfill(status=503, body="down"))
    page.goto(broker.console)
    empty = page.locator("#addresses-empty")
    expect(empty).to_have_attribute("data-state", "error")
    expect(empty).to_contain_text("Could not list addresses")
    expect(empty).not_to_contain_text("No addresses yet")
    expect(page.locator("#conn")).to_have_attribute("data-state", "error")


def test_console_opens_an_address_on_its_recent_history_then_live(broker: Broker, page: Page) -> None:
    send_lines(broker, "history.demo", [f"msg-{i}" for i in range(1, 81)])
    page.add_init_script(WATCH_EMPTY_STATES)
    page.goto(broker.console, wait_until="networkidle")
    open_address(page, "history.demo")
    # The last 50 of the 80 retained, newest first: #80 at the top, #31 the oldest shown.
    expect(page.locator("#tail")).to_have_attribute("data-from", "31")
    items = page.locator("#tail li[data-sequence]")
    expect(items).to_have_count(50)
    expect(items.first).to_have_attribute("data-sequence", "80")
    expect(items.last).to_have_attribute("data-sequence", "31")
    expect(items.last).to_contain_text("msg-31")
    expect(page.locator("#tail-empty")).to_be_hidden()
    # Then live on the same stream: no gap, no duplicate.
    assert broker.cli("send", "history.demo", "live one").strip() == "81"
    expect(page.locator('#tail li[data-sequence="81"]')).to_contain_text("live one")
    expect(items).to_have_count(51)
    seqs = items.evaluate_all("els => els.map(e => e.dataset.sequence)")
    assert seqs == [str(n) for n in range(81, 30, -1)]
    # "Waiting for messages…" was never shown over this history.
    seen = states(page, "tail-empty")
    assert not any(s.startswith("Waiting for messages") for s in seen), seen
    shot(page, "console-history.png")


def test_console_waits_on_an_address_that_retains_nothing(broker: Broker, page: Page) -> None:
    page.add_init_script(WATCH_EMPTY_STATES)
    page.goto(broker.console, wait_until="networkidle")
    # An address with history first: the tail never says it is waiting over it...
    send_lines(broker, "busy.demo", ["one", "two", "three"])
    open_address(page, "busy.demo")
    expect(page.locator("#tail li[data-sequence]")).to_have_count(3)
    assert not any(s.startswith("Waiting for messages") for s in states(page, "tail-empty"))
    # ...an address that retains nothing does, until its first message arrives live.
    open_address(page, "quiet.demo")
    expect(page.locator("#tail-empty")).to_have_text("Waiting for messages…")
    expect(page.locator("#tail-empty")).to_be_visible()
    expect(page.locator("#tail li")).to_have_count(0)
    assert broker.cli("send", "quiet.demo", "at last").strip() == "1"
    expect(page.locator('#tail li[data-sequence="1"]')).to_contain_text("at last")
    expect(page.locator("#tail-empty")).to_be_hidden()
