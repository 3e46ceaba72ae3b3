// switchboard's web console. It speaks gRPC-Web (Connect-ES) to the listener that served it, so
// the page and its calls share one origin and need no CORS. Unary calls poll the address table
// every second; a Subscribe stream (the live tail) opens only when an address is opened, so the
// page's network settles after the first render.
//
// Empty states say only what an answer said: the address table reads "Loading addresses…" until
// the first ListAddresses answer, and an opened address shows its most recent retained messages
// (a Subscribe from just before the last RECENT of them, going live on the same stream) and
// "Waiting for messages…" only when GetAddress says it retains none.

import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import {
  Admin,
  Broker,
  type AddressInfo,
  type GroupInfo,
  type Message,
} from "./gen/switchboard/v1/broker_pb";

const TOKEN_KEY = "switchboard.token";
/** Address table refresh period, ms. */
const POLL_MS = 1000;
/** Group lag samples kept per group: 5 minutes at one sample per 2 s. */
const LAG_SAMPLES = 150;
const LAG_SAMPLE_MS = 2000;
/** Messages kept in the tail's list; older ones are removed from the page. */
const TAIL_MAX = 500;
/** Groups shown in the table are fetched for at most this many addresses per refresh. */
const GROUP_LOOKUPS = 25;
/** Retained messages shown when an address is opened, before the tail goes live. */
const RECENT = 50n;

// ---------------------------------------------------------------------------------------------
// Transport and clients

const withToken: Interceptor = (next) => async (req) => {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) req.header.set("authorization", `Bearer ${token}`);
  return next(req);
};
const transport = createGrpcWebTransport({
  baseUrl: window.location.origin,
  interceptors: [withToken],
});
const broker = createClient(Broker, transport);
const admin = createClient(Admin, transport);

// ---------------------------------------------------------------------------------------------
// Small DOM helpers

function $<T extends HTMLElement = HTMLElement>(id: string): T {
  const el = document.getElementById(id);
  if (!el) throw new Error(`missing #${id}`);
  return el as T;
}

function h(
  tag: string,
  attrs: Record<string, string> = {},
  ...children: (Node | string)[]
): HTMLElement {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  el.append(...children);
  return el;
}

const SVG = "http://www.w3.org/2000/svg";

function describe(e: unknown): string {
  const err = ConnectError.from(e);
  return `${Code[err.code] ?? err.code}: ${err.rawMessage}`;
}

function bytes(n: bigint | number): string {
  const v = Number(n);
  if (v < 1024) return `${v} B`;
  if (v < 1024 * 1024) return `${(v / 1024).toFixed(1)} KiB`;
  if (v < 1024 ** 3) return `${(v / 1024 / 1024).toFixed(1)} MiB`;
  return `${(v / 1024 ** 3).toFixed(2)} GiB`;
}

function count(n: bigint | number): string {
  return Number(n).toLocaleString("en-US");
}

// ---------------------------------------------------------------------------------------------
// Connection state and the token

const conn = $("conn");
function setConn(state: "ok" | "error" | "auth" | "connecting", text: string): void {
  conn.dataset.state = state;
  conn.textContent = text;
}

const tokenPanel = $("token-panel");
function askForToken(why: string): void {
  $("token-why").textContent = why;
  tokenPanel.hidden = false;
}
$("token-button").addEventListener("click", () => {
  tokenPanel.hidden = !tokenPanel.hidden;
  if (!tokenPanel.hidden) $("token-input").focus();
});
$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = $<HTMLInputElement>("token-input").value.trim();
  if (v) sessionStorage.setItem(TOKEN_KEY, v);
  $<HTMLInputElement>("token-input").value = "";
  tokenPanel.hidden = true;
  void refresh();
});
$("token-clear").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  $("token-why").textContent = "Token forgotten.";
});

/** Handles an error from a call; returns true if it was an auth problem. */
function callFailed(e: unknown): boolean {
  const err = ConnectError.from(e);
  if (err.code === Code.Unauthenticated || err.code === Code.PermissionDenied) {
    setConn("auth", err.code === Code.Unauthenticated ? "token needed" : "not permitted");
    askForToken(err.rawMessage);
    return true;
  }
  setConn("error", `offline: ${Code[err.code] ?? err.code}`);
  return false;
}

// ---------------------------------------------------------------------------------------------
// The address table

interface RateSample {
  seq: bigint;
  at: number;
  rate: number;
}
const rates = new Map<string, RateSample>();
const groupsByAddress = new Map<string, GroupInfo[]>();
let selected: string | null = null;

function rateOf(a: AddressInfo, now: number): number {
  const prev = rates.get(a.address);
  let rate = 0;
  if (prev && now > prev.at) {
    const delta = Number(a.lastSequence - prev.seq);
    rate = delta > 0 ? (delta * 1000) / (now - prev.at) : 0;
    // Smooth a little so the number does not jump between polls.
    rate = prev.rate * 0.3 + rate * 0.7;
  }
  rates.set(a.address, { seq: a.lastSequence, at: now, rate });
  return rate;
}

/**
 * Whether nobody reads the default group. GroupInfo carries no reader count or last-read time,
 * so this is decided from the group's position: `next_sequence - dropped` moves only when the
 * group hands a message out (retention raises both equally), and the default group starts at 1.
 * Still at 1: the default group has never handed out a message, so no consumer is known and its
 * lag is only what fan-out-only use leaves behind. (A consumer that read once and then stopped
 * is not detected: the broker does not report it.)
 */
function unread(g: GroupInfo): boolean {
  return g.group === "" && g.nextSequence - g.dropped <= 1n;
}
const UNREAD_TITLE =
  "nobody reads the default group (it has never handed out a message; its lag is what Recv without a group would get)";

function groupCell(a: AddressInfo): HTMLElement {
  const td = h("td", { class: "groups-cell" });
  const groups = groupsByAddress.get(a.address);
  if (!groups || groups.length === 0) {
    td.append(h("span", { class: "dim" }, a.groups > 0 ? `${a.groups}` : "–"));
    return td;
  }
  for (const g of groups) {
    const name = g.group === "" ? "(default)" : g.group;
    const lag = g.lag;
    const muted = unread(g);
    const stats = `lag ${lag}, pending ${g.pending}, redelivered ${g.redelivered}, dead-lettered ${g.deadLettered}`;
    td.append(
      h(
        "span",
        {
          class: muted ? "chip muted" : lag > 0n ? "chip warn" : "chip",
          "data-group": g.group,
          "data-lag": lag.toString(),
          "data-muted": muted ? "true" : "false",
          title: muted ? `${UNREAD_TITLE}: ${stats}` : `${name}: ${stats}`,
        },
        `${name} · ${count(lag)}`,
      ),
    );
  }
  return td;
}

/** The line under the table: loading (before the first answer), empty, error or refused. */
function setListState(state: "loading" | "ok" | "empty" | "error" | "denied", text = ""): void {
  const el = $("addresses-empty");
  el.dataset.state = state;
  el.hidden = state === "ok";
  if (text) el.textContent = text;
}

function renderTable(addresses: AddressInfo[]): void {
  const now = performance.now();
  const body = $("addresses-body");
  const rows = addresses.map((a) => {
    const rate = rateOf(a, now);
    const tr = h(
      "tr",
      { "data-address": a.address, tabindex: "0", class: a.address === selected ? "sel" : "" },
      h("td", { class: "mono addr", title: a.address }, a.address),
      h("td", { class: "num" }, count(a.retainedMessages)),
      h("td", { class: "num" }, bytes(a.retainedBytes)),
      h("td", { class: "num" }, count(a.lastSequence)),
      h("td", { class: "num" }, rate >= 10 ? `${Math.round(rate)}/s` : `${rate.toFixed(1)}/s`),
      h("td", { class: "num" }, count(a.subscribers)),
      groupCell(a),
    );
    const open = () => openAddress(a.address);
    tr.addEventListener("click", open);
    tr.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") open();
    });
    return tr;
  });
  body.replaceChildren(...rows);
  if (addresses.length > 0) setListState("ok");
  else setListState("empty", "No addresses yet. Send a message to create one.");
}

async function listAll(): Promise<AddressInfo[]> {
  const out: AddressInfo[] = [];
  let pageToken = "";
  for (let i = 0; i < 20; i++) {
    const r = await admin.listAddresses({ pageSize: 500, pageToken });
    out.push(...r.addresses);
    if (!r.nextPageToken) break;
    pageToken = r.nextPageToken;
  }
  return out;
}

let refreshing = false;
async function refresh(): Promise<void> {
  if (refreshing) return;
  refreshing = true;
  try {
    const addresses = await listAll();
    addresses.sort((a, b) => a.address.localeCompare(b.address));
    const withGroups = addresses.filter((a) => a.groups > 0).slice(0, GROUP_LOOKUPS);
    await Promise.all(
      withGroups.map(async (a) => {
        try {
          const r = await admin.getAddress({ address: a.address });
          groupsByAddress.set(a.address, r.groups);
        } catch {
          groupsByAddress.delete(a.address);
        }
      }),
    );
    renderTable(addresses);
    setConn("ok", `connected · ${addresses.length} address${addresses.length === 1 ? "" : "es"}`);
  } catch (e) {
    const err = ConnectError.from(e);
    if (err.code === Code.PermissionDenied) {
      // A token without `admin` may still tail and publish where it is permitted.
      $("addresses-body").replaceChildren();
      setListState("denied", `This token may not list addresses (${err.rawMessage}); open one by name.`);
      setConn("auth", "no admin permission");
    } else {
      callFailed(e);
      // Rows already shown stay (the bar says the page is offline); with none, say why.
      if ($("addresses-body").childElementCount === 0) {
        setListState("error", `Could not list addresses (${describe(e)}).`);
      }
    }
  } finally {
    refreshing = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Group lag over time (sampled for the open address)

const lagHistory = new Map<string, number[]>();

function sparkline(samples: number[]): SVGSVGElement {
  const w = 240;
  const hgt = 40;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
  svg.setAttribute("class", "spark");
  svg.setAttribute("role", "img");
  const max = Math.max(1, ...samples);
  const step = w / (LAG_SAMPLES - 1);
  const x0 = w - (samples.length - 1) * step;
  const pts = samples.map((v, i) => `${(x0 + i * step).toFixed(1)},${(hgt - 2 - (v / max) * (hgt - 4)).toFixed(1)}`);
  const area = document.createElementNS(SVG, "polygon");
  area.setAttribute("points", `${x0.toFixed(1)},${hgt} ${pts.join(" ")} ${w},${hgt}`);
  area.setAttribute("class", "spark-area");
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", pts.join(" "));
  line.setAttribute("class", "spark-line");
  svg.append(area, line);
  const title = document.createElementNS(SVG, "title");
  title.textContent = `lag, last ${Math.round((samples.length * LAG_SAMPLE_MS) / 1000)} s; max ${max}`;
  svg.append(title);
  return svg;
}

async function sampleGroups(): Promise<void> {
  const address = selected;
  if (!address) return;
  let groups: GroupInfo[];
  try {
    groups = (await admin.getAddress({ address })).groups;
  } catch (e) {
    const code = ConnectError.from(e).code;
    // NotFound: nothing sent yet; PermissionDenied: a token without admin sees no groups.
    if (code !== Code.NotFound && code !== Code.PermissionDenied) callFailed(e);
    groups = [];
  }
  if (address !== selected) return;
  const box = $("groups");
  $("groups-section").hidden = groups.length === 0;
  const cards = groups.map((g) => {
    const key = `${address}\u0000${g.group}`;
    const hist = lagHistory.get(key) ?? [];
    hist.push(Number(g.lag));
    if (hist.length > LAG_SAMPLES) hist.splice(0, hist.length - LAG_SAMPLES);
    lagHistory.set(key, hist);
    const name = g.group === "" ? "(default)" : g.group;
    const muted = unread(g);
    return h(
      "div",
      muted
        ? { class: "group muted", "data-group": g.group, "data-muted": "true", title: UNREAD_TITLE }
        : { class: "group", "data-group": g.group, "data-muted": "false" },
      h(
        "div",
        { class: "group-head" },
        h("span", { class: "mono" }, name),
        h("span", { class: "lag" }, muted ? `lag ${count(g.lag)} · unread` : `lag ${count(g.lag)}`),
      ),
      sparkline(hist),
      h("div", { class: "axis" }, h("span", {}, "−5 min"), h("span", {}, "now")),
      h(
        "div",
        { class: "dim small" },
        `pending ${count(g.pending)} · redelivered ${count(g.redelivered)} · dead-lettered ${count(g.deadLettered)}`,
      ),
    );
  });
  box.replaceChildren(...cards);
}

// ---------------------------------------------------------------------------------------------
// The live tail

let format: "text" | "hex" = "text";
let tailAbort: AbortController | null = null;
let lastSeen = 0n;
const decoder = new TextDecoder("utf-8", { fatal: true });
/** Each tail row's payload, so the Text/Hex switch re-renders without another call. */
const payloads = new WeakMap<Element, Uint8Array>();

function hex(b: Uint8Array): string {
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join(" ");
}

function payloadText(b: Uint8Array): { text: string; binary: boolean } {
  if (format === "hex") return { text: hex(b), binary: false };
  try {
    const s = decoder.decode(b);
    // Control characters other than whitespace mean binary.
    if (/[\u0000-\u0008\u000e-\u001f]/.test(s)) return { text: hex(b), binary: true };
    return { text: s, binary: false };
  } catch {
    return { text: hex(b), binary: true };
  }
}

function tailRow(m: Message): HTMLElement {
  const when = m.sentAt ? timestampDate(m.sentAt) : null;
  const { text, binary } = payloadText(m.payload);
  const headers = Object.entries(m.headers);
  const li = h(
    "li",
    { "data-sequence": m.sequence.toString() },
    h(
      "div",
      { class: "meta" },
      h("span", { class: "seq mono" }, `#${m.sequence}`),
      h("time", { datetime: when?.toISOString() ?? "" }, when ? when.toLocaleTimeString() : ""),
      h("span", { class: "dim" }, `${m.payload.length} B${binary ? " · binary, shown as hex" : ""}`),
    ),
    h("pre", { class: "payload" }, text || "(empty payload)"),
  );
  payloads.set(li, m.payload);
  if (headers.length > 0) {
    li.append(
      h(
        "div",
        { class: "headers" },
        ...headers.map(([k, v]) => h("span", { class: "chip" }, `${k}: ${v}`)),
      ),
    );
  }
  return li;
}

function setTailState(state: "live" | "replay" | "idle" | "error", text: string): void {
  const el = $("tail-state");
  el.dataset.state = state;
  el.textContent = text;
}

function setTailEmpty(state: "loading" | "waiting" | "replay" | "none", text = ""): void {
  const el = $("tail-empty");
  el.dataset.state = state;
  el.hidden = state === "none";
  if (text) el.textContent = text;
}

/**
 * Where opening `address` starts: its last RECENT retained messages (`start` is the oldest of
 * them, `retained` false when it retains none: then `start` is its next sequence, 1 for an
 * address that does not exist yet), or 0 ("from now") when the token may not read it through
 * the Admin service.
 */
async function openingSequence(address: string): Promise<{ start: bigint; retained: boolean }> {
  try {
    const info = (await admin.getAddress({ address })).address;
    const first = info?.firstSequence ?? 0n;
    const last = info?.lastSequence ?? 0n;
    if (first === 0n || last < first) return { start: last + 1n, retained: false };
    const recent = last - (RECENT - 1n);
    return { start: recent > first ? recent : first, retained: true };
  } catch (e) {
    const code = ConnectError.from(e).code;
    if (code === Code.NotFound) return { start: 1n, retained: false };
    if (code === Code.PermissionDenied) return { start: 0n, retained: false };
    throw e;
  }
}

/**
 * Tails `address` from `from` (a sequence), or, when `from` is null, from its most recent
 * retained messages and then live on the same stream (no gap, no duplicate): the start is read
 * just before subscribing, so nothing sent after the tail was opened is missed while the stream
 * is being set up.
 */
async function tail(address: string, from: bigint | null): Promise<void> {
  tailAbort?.abort();
  const abort = new AbortController();
  tailAbort = abort;
  const list = $("tail");
  setTailState(from === null ? "live" : "replay", from === null ? "live" : `replaying from #${from}`);
  const shown = list.querySelector("li[data-sequence]") !== null;
  if (!shown) {
    if (from === null) setTailEmpty("loading", "Loading recent messages…");
    else setTailEmpty("replay", `Replaying from #${from}…`);
  }
  try {
    let startSequence: bigint;
    if (from === null) {
      const opening = await openingSequence(address);
      if (abort.signal.aborted) return;
      startSequence = opening.start;
      if (!shown && !opening.retained) setTailEmpty("waiting", "Waiting for messages…");
    } else {
      startSequence = from;
    }
    if (abort.signal.aborted) return;
    list.dataset.from = startSequence.toString();
    const stream = broker.subscribe({ address, startSequence }, { signal: abort.signal });
    for await (const ev of stream) {
      if (abort.signal.aborted) return;
      if (ev.event.case === "message") {
        const m = ev.event.value;
        lastSeen = m.sequence;
        list.prepend(tailRow(m));
        while (list.childElementCount > TAIL_MAX) list.lastElementChild?.remove();
        setTailEmpty("none");
        setTailState("live", `live · last #${m.sequence}`);
      } else if (ev.event.case === "dropped") {
        list.prepend(
          h("li", { class: "dropped" }, `${count(ev.event.value.count)} messages dropped (slow reader or retention)`),
        );
        setTailEmpty("none");
      }
    }
    if (!abort.signal.aborted) setTailState("idle", "stream ended");
  } catch (e) {
    if (abort.signal.aborted) return;
    const err = ConnectError.from(e);
    if (err.code === Code.Canceled) return;
    if (list.querySelector("li") === null) setTailEmpty("none");
    if (!callFailed(e)) setTailState("error", describe(e));
    else setTailState("error", "not permitted");
  }
}

function stopTail(): void {
  tailAbort?.abort();
  tailAbort = null;
  setTailState("idle", "stopped");
}

function openAddress(address: string): void {
  selected = address;
  $("tail-section").hidden = false;
  $("detail-empty").hidden = true;
  $("tail-address").textContent = address;
  $("tail").replaceChildren();
  delete $("tail").dataset.from;
  $("detail-title").textContent = address;
  const pub = $<HTMLInputElement>("publish-address");
  pub.value = address;
  for (const tr of $("addresses-body").querySelectorAll("tr")) {
    tr.classList.toggle("sel", tr.dataset.address === address);
  }
  lastSeen = 0n;
  void tail(address, null);
  void sampleGroups();
  history.replaceState(null, "", `#${encodeURIComponent(address)}`);
}

$("open-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = $<HTMLInputElement>("open-input").value.trim();
  if (v) openAddress(v);
});
$("replay-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (!selected) return;
  const raw = $<HTMLInputElement>("replay-from").value.trim();
  const from = /^\d+$/.test(raw) && raw !== "0" ? BigInt(raw) : 1n;
  $("tail").replaceChildren();
  void tail(selected, from);
});
$("tail-live").addEventListener("click", () => {
  if (!selected) return;
  // Carry on after the last message shown, without a gap; from now if none was shown.
  void tail(selected, lastSeen > 0n ? lastSeen + 1n : null);
});
$("tail-stop").addEventListener("click", stopTail);

function setFormat(f: "text" | "hex"): void {
  format = f;
  $("fmt-text").classList.toggle("on", f === "text");
  $("fmt-hex").classList.toggle("on", f === "hex");
  for (const li of $("tail").querySelectorAll<HTMLElement>("li[data-sequence]")) {
    const pre = li.querySelector("pre");
    const b = payloads.get(li);
    if (!pre || !b) continue;
    pre.textContent = payloadText(b).text || "(empty payload)";
  }
}
$("fmt-text").addEventListener("click", () => setFormat("text"));
$("fmt-hex").addEventListener("click", () => setFormat("hex"));

// ---------------------------------------------------------------------------------------------
// Publishing

function parseHeaders(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split("\n")) {
    const t = line.trim();
    if (!t) continue;
    const i = t.indexOf(":");
    if (i <= 0) throw new Error(`header line "${t}" is not "key: value"`);
    out[t.slice(0, i).trim()] = t.slice(i + 1).trim();
  }
  return out;
}

$("publish-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const result = $("publish-result");
  const button = $<HTMLButtonElement>("publish-button");
  const address = $<HTMLInputElement>("publish-address").value.trim();
  let headers: Record<string, string>;
  try {
    headers = parseHeaders($<HTMLTextAreaElement>("publish-headers").value);
  } catch (e) {
    result.className = "result err";
    result.textContent = (e as Error).message;
    return;
  }
  button.disabled = true;
  try {
    const r = await broker.send({
      address,
      payload: new TextEncoder().encode($<HTMLTextAreaElement>("publish-payload").value),
      headers,
      messageId: $<HTMLInputElement>("publish-id").value.trim(),
    });
    result.className = "result ok";
    result.textContent = r.duplicate
      ? `duplicate of sequence ${r.sequence} (not stored again)`
      : `sent · sequence ${r.sequence}`;
    if (selected !== address) openAddress(address);
    void refresh();
  } catch (e) {
    result.className = "result err";
    result.textContent = describe(e);
    callFailed(e);
  } finally {
    button.disabled = false;
  }
});

// ---------------------------------------------------------------------------------------------
// Start

void refresh();
setInterval(() => void refresh(), POLL_MS);
setInterval(() => void sampleGroups(), LAG_SAMPLE_MS);
const initial = decodeURIComponent(window.location.hash.slice(1));
if (initial) openAddress(initial);
