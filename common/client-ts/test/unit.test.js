// Unit tests of the client against a scripted WebSocket: the recovery rules of
// common/PROTOCOL.md, one by one. `npm test` (node --test) runs them.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ChatClient, ChatError, closeRetry, compareIds, errorRetry, isMessageId } from "../dist/index.js";

/** A WebSocket the test plays the server for. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = new URL(url);
    this.readyState = 0;
    this.sent = [];
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeSocket.all.push(this);
  }
  send(data) {
    this.sent.push(JSON.parse(data));
  }
  close(code = 1005) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code }));
  }
  // The server's side.
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  frame(f) {
    this.onmessage?.({ data: JSON.stringify(f) });
  }
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code });
  }
  static last() {
    return FakeSocket.all[FakeSocket.all.length - 1];
  }
}

function client(extra = {}) {
  FakeSocket.all = [];
  return new ChatClient({
    url: "http://router.test:8080",
    user: "alice",
    WebSocket: FakeSocket,
    backoff: { minMs: 1, maxMs: 5 },
    fetch: async () => {
      throw new Error("no network in unit tests");
    },
    ...extra,
  });
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

async function until(what, cond, ms = 2000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await tick(1);
  }
}

/** The `n`th socket the client opened (1-based), once it has. */
async function socket(n) {
  await until(`socket ${n}`, () => FakeSocket.all.length >= n);
  return FakeSocket.all[n - 1];
}

const msg = (room, id, body = `m${id}`) => ({ type: "message", room, id, from: "bob", cid: `b${id}`, body, ts: 1 });

test("ids compare as unsigned 64-bit decimals, never as doubles", () => {
  assert.ok(compareIds("9", "10") < 0);
  assert.ok(compareIds("18446744073709551615", "18446744073709551614") > 0);
  // Both round to the same double.
  assert.ok(compareIds("9007199254740993", "9007199254740992") > 0);
  assert.equal(compareIds("42", "42"), 0);
  for (const ok of ["0", "1", "18446744073709551615"]) assert.ok(isMessageId(ok), ok);
  for (const bad of ["+1", "01", " 1", "1 ", "-1", "", "18446744073709551616", 5]) assert.ok(!isMessageId(bad), String(bad));
});

test("the first join connects with the room and the dev user; later joins go over the socket", async () => {
  const c = client();
  const states = [];
  c.on("state", (s) => states.push(s));
  const first = c.join("lobby");
  const ws = await socket(1);
  assert.equal(ws.url.pathname, "/ws");
  assert.equal(ws.url.protocol, "ws:");
  assert.equal(ws.url.searchParams.get("room"), "lobby");
  assert.equal(ws.url.searchParams.get("user"), "alice");
  assert.equal(ws.url.searchParams.get("since"), null);
  ws.open();
  ws.frame({ type: "joined", room: "lobby", head: "5" });
  assert.deepEqual(await first, { room: "lobby", head: "5" });
  const second = c.join("other", { since: "3" });
  assert.deepEqual(ws.sent, [{ type: "join", room: "other", since: "3" }]);
  ws.frame({ type: "joined", room: "other" });
  await second;
  assert.deepEqual(states, ["connecting", "open"]);
  c.close();
  assert.equal(c.state, "closed");
});

test("a send resolves on its ack; a lost connection resumes with since and resends with the same cid", async () => {
  const c = client();
  const seen = [];
  c.on("message", (m) => seen.push(m.id));
  let resumed;
  c.on("resumed", (r) => (resumed = r));
  const joined = Promise.all([c.join("a"), c.join("b")]);
  let ws = await socket(1);
  ws.open();
  ws.frame({ type: "joined", room: "a" });
  ws.frame({ type: "joined", room: "b" });
  await joined;
  ws.frame(msg("a", "10"));
  ws.frame(msg("b", "7"));
  const acked = c.send("a", "hello");
  const sent = ws.sent.find((f) => f.type === "send");
  assert.equal(sent.body, "hello");
  const unacked = c.send("b", "unacked one");
  const cid = ws.sent.filter((f) => f.type === "send")[1].cid;
  ws.frame({ type: "ack", room: "a", cid: sent.cid, id: "11", duplicate: false });
  assert.deepEqual(await acked, { room: "a", cid: sent.cid, id: "11", duplicate: false });

  ws.drop(1006);
  await until("a reconnect", () => FakeSocket.all.length === 2);
  ws = FakeSocket.last();
  assert.equal(ws.url.searchParams.get("room"), "a");
  assert.equal(ws.url.searchParams.get("since"), "10");
  ws.open();
  assert.deepEqual(ws.sent, [{ type: "join", room: "b", since: "7" }]);
  ws.frame({ type: "joined", room: "a" });
  ws.frame({ type: "joined", room: "b" });
  // The unacked send goes again with its cid once its room is joined.
  assert.deepEqual(ws.sent.at(-1), { type: "send", room: "b", cid, body: "unacked one" });
  assert.deepEqual(resumed.rooms, ["a", "b"]);
  // A copy at or before the last id delivered is not handed over twice.
  ws.frame(msg("a", "10"));
  ws.frame(msg("a", "12"));
  ws.frame({ type: "ack", room: "b", cid, id: "8", duplicate: true });
  assert.equal((await unacked).duplicate, true);
  assert.deepEqual(seen, ["10", "7", "12"]);
  c.close();
});

test("refusals follow the code table: do_not_retry rejects, retry_later resends the same cid", async () => {
  const c = client();
  const joined = c.join("r");
  const ws = await socket(1);
  ws.open();
  ws.frame({ type: "joined", room: "r" });
  await joined;
  const tooLong = c.send("r", "x".repeat(10));
  const limited = c.send("r", "later");
  const [first, second] = ws.sent.filter((f) => f.type === "send");
  ws.frame({ type: "error", code: "body_too_long", message: "too long", cid: first.cid, room: "r" });
  await assert.rejects(tooLong, (e) => e instanceof ChatError && e.code === "body_too_long" && e.retry === "do_not_retry");
  ws.frame({ type: "error", code: "rate_limited", message: "slow down", cid: second.cid, room: "r" });
  await until("the resend", () => ws.sent.filter((f) => f.cid === second.cid).length === 2);
  ws.frame({ type: "ack", room: "r", cid: second.cid, id: "3", duplicate: false });
  assert.equal((await limited).id, "3");
  await assert.rejects(c.send("nowhere", "x"), (e) => e.code === "not_joined");
  c.close();
});

test("an expired token (4003) is replaced through getToken before the reconnect", async () => {
  let n = 0;
  const c = client({ user: undefined, getToken: async () => `token-${++n}` });
  c.join("r");
  await until("the first socket", () => FakeSocket.all.length === 1);
  let ws = FakeSocket.last();
  assert.equal(ws.url.searchParams.get("token"), "token-1");
  ws.open();
  ws.frame({ type: "joined", room: "r" });
  ws.drop(4003);
  await until("a reconnect", () => FakeSocket.all.length === 2);
  ws = FakeSocket.last();
  assert.equal(ws.url.searchParams.get("token"), "token-2");
  c.close();
});

test("4029 backs off at least a second; 1002 ends the client and rejects what is pending", async () => {
  const c = client({ random: () => 0 });
  c.join("r");
  let ws = await socket(1);
  ws.open();
  ws.frame({ type: "joined", room: "r" });
  const started = Date.now();
  ws.drop(4029);
  await until("a reconnect", () => FakeSocket.all.length === 2, 3000);
  assert.ok(Date.now() - started >= 990, `reconnected after ${Date.now() - started} ms`);
  ws = FakeSocket.last();
  ws.open();
  ws.frame({ type: "joined", room: "r" });
  const pending = c.send("r", "x");
  const errors = [];
  c.on("error", (e) => errors.push(e.code));
  ws.drop(1002);
  await assert.rejects(pending, (e) => e.code === "protocol_error");
  assert.equal(c.state, "closed");
  assert.ok(errors.includes("protocol_error"), errors.join());
  await assert.rejects(c.join("again"), (e) => e.code === "client_closed");
});

test("a refused upgrade is read over HTTP: a forbidden room is dropped, the others go on", async () => {
  const fetched = [];
  const c = client({
    fetch: async (url) => {
      fetched.push(new URL(url));
      return new Response(JSON.stringify({ code: "forbidden", message: "no", retry: "do_not_retry" }), { status: 403 });
    },
  });
  const denied = c.join("secret");
  const fine = c.join("open");
  (await socket(1)).drop(1006);
  await assert.rejects(denied, (e) => e.code === "forbidden" && e.status === 403);
  assert.equal(fetched[0].protocol, "http:");
  assert.equal(fetched[0].searchParams.get("room"), "secret");
  await until("a connection for the other room", () => FakeSocket.all.length === 2);
  const ws = FakeSocket.last();
  assert.equal(ws.url.searchParams.get("room"), "open");
  ws.open();
  ws.frame({ type: "joined", room: "open" });
  await fine;
  c.close();
});

test("the retry table covers network closes and unknown codes", () => {
  assert.equal(closeRetry(1006), "reconnect_and_resume");
  assert.equal(closeRetry(4001), "reconnect_and_resume");
  assert.equal(closeRetry(4003), "do_not_retry");
  assert.equal(errorRetry("store_unavailable"), "retry_later");
  assert.equal(errorRetry("something_new"), "do_not_retry");
});

test("a quiet connection is pinged; one that stops answering is replaced and resumed", async () => {
  const c = client({ heartbeatMs: 40, heartbeatTimeoutMs: 60 });
  const joined = c.join("r");
  let ws = await socket(1);
  ws.open();
  ws.frame({ type: "joined", room: "r" });
  await joined;
  ws.frame(msg("r", "4"));
  await until("a ping", () => ws.sent.some((f) => f.type === "ping"));
  // Answered: the connection stays.
  ws.frame({ type: "pong" });
  const pings = () => ws.sent.filter((f) => f.type === "ping").length;
  await until("the next ping", () => pings() === 2);
  assert.equal(FakeSocket.all.length, 1);
  // Not answered: replaced, and the room rejoined from the last id.
  await until("a new socket", () => FakeSocket.all.length === 2);
  ws = FakeSocket.last();
  assert.equal(ws.url.searchParams.get("since"), "4");
  c.close();
});

test("a failed upgrade whose plain GET gets 426 (nothing refused) is retried, the room kept", async () => {
  const c = client({
    fetch: async () =>
      new Response(JSON.stringify({ code: "invalid_field", message: "expected a WebSocket upgrade request" }), {
        status: 426,
      }),
  });
  const joined = c.join("r");
  (await socket(1)).drop(1006);
  const ws = await socket(2);
  assert.equal(ws.url.searchParams.get("room"), "r");
  ws.open();
  ws.frame({ type: "joined", room: "r" });
  await joined;
  c.close();
});
