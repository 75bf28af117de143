// The SDK against a real local cluster (two chat-nodes, a router, the real Redis and CQL
// server): what the app sees is judged against what the store holds, read back over the
// history API. Run by deploy/local/test.sh (`npm run test:cluster`).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, writeFileSync } from "node:fs";
import WebSocket from "ws";
import { ChatClient } from "../dist/index.js";
import { Cluster, roomOwnedBy, token } from "./cluster.js";

let cluster;
const clients = [];
const figures = {};

before(async () => {
  cluster = await Cluster.start(2);
});

after(async () => {
  console.log(`# measured: ${JSON.stringify(figures)}`);
  for (const c of clients) c.close();
  await cluster?.stop();
  mkdirSync("test-artifacts", { recursive: true });
  writeFileSync("test-artifacts/cluster-figures.json", JSON.stringify(figures, null, 2));
});

function client(user, extra = {}) {
  const c = new ChatClient({
    url: cluster.url,
    getToken: () => token(user),
    WebSocket,
    backoff: { minMs: 100, maxMs: 2000 },
    ...extra,
  });
  clients.push(c);
  return c;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(what, cond, ms = 30_000) {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(50);
  }
}

/** Messages `c` hands the app for `room`, in order. */
function received(c, room) {
  const got = [];
  c.on("message", (m) => m.room === room && got.push(m));
  return got;
}

/**
 * Nothing lost, nothing twice, no gap: every send was acked, the store holds each sent
 * body exactly once under its acked id, and the reader saw exactly the stored messages,
 * in the store's order.
 */
async function judge(room, sent, acks, seen) {
  const stored = await cluster.stored(room);
  assert.deepEqual(
    stored.map((m) => m.body).sort(),
    [...sent].sort(),
    "the store holds every sent body exactly once",
  );
  const storedIds = new Map(stored.map((m) => [m.cid, m.id]));
  for (const a of acks) assert.equal(storedIds.get(a.cid), a.id, `ack of ${a.cid} names its stored id`);
  await until("the reader to catch up", () => seen.length >= stored.length);
  assert.deepEqual(
    seen.map((m) => m.cid),
    stored.map((m) => m.cid),
    "the reader saw every stored message once, in order",
  );
}

test("send is acked with the stored id; a resend with the same cid is a duplicate", async () => {
  const room = await roomOwnedBy(cluster, 1, "dedupe");
  const alice = client("alice");
  await alice.join(room);
  const first = await alice.send(room, "once", { cid: "dup-1" });
  assert.equal(first.duplicate, false);
  const again = await alice.send(room, "once", { cid: "dup-1" });
  assert.deepEqual({ id: again.id, duplicate: again.duplicate }, { id: first.id, duplicate: true });
  const published = await alice.publish(room, "once", { cid: "dup-1" });
  assert.deepEqual({ id: published.id, duplicate: published.duplicate }, { id: first.id, duplicate: true });
  const stored = await cluster.stored(room);
  assert.deepEqual(
    stored.map((m) => [m.id, m.cid]),
    [[first.id, "dup-1"]],
  );
});

test("history pages back and forward over what the store holds", async () => {
  const room = await roomOwnedBy(cluster, 2, "history");
  const alice = client("alice");
  await alice.join(room);
  const ids = [];
  for (let i = 0; i < 25; i++) ids.push((await alice.send(room, `h${i}`)).id);
  const back = [];
  let page = await alice.history(room, { limit: 10 });
  back.unshift(...page.messages);
  while (page.hasMore) {
    page = await alice.history(room, { limit: 10, before: page.messages[0].id });
    back.unshift(...page.messages);
  }
  assert.deepEqual(
    back.map((m) => m.id),
    ids,
  );
  const fwd = await alice.history(room, { after: ids[19], limit: 10 });
  assert.deepEqual(
    fwd.messages.map((m) => m.body),
    ["h20", "h21", "h22", "h23", "h24"],
  );
  assert.equal(fwd.hasMore, false);
});

test("presence: another member's join and leave", async () => {
  const room = await roomOwnedBy(cluster, 1, "presence");
  const alice = client("alice");
  const events = [];
  alice.on("presence", (p) => p.room === room && events.push(`${p.user}:${p.event}`));
  await alice.join(room);
  const bob = client("bob");
  await bob.join(room);
  await until("bob's join", () => events.includes("bob:join"));
  bob.close();
  await until("bob's leave", () => events.includes("bob:leave"));
  assert.deepEqual(events, ["bob:join", "bob:leave"]);
});

/** Alice sends `count` messages, one every `gapMs`, doing `fault` after the `at`th. */
async function sendThrough(alice, room, count, at, fault, gapMs = 40) {
  const sent = [];
  const sends = [];
  for (let i = 0; i < count; i++) {
    const body = `${room}-${i}`;
    sent.push(body);
    sends.push(alice.send(room, body));
    if (i === at) await fault();
    await sleep(gapMs);
  }
  const acks = await Promise.all(sends);
  return { sent, acks };
}

test("the owner is SIGKILLed and restarted: the app sees every message once, no gap", async () => {
  const room = await roomOwnedBy(cluster, 1, "kill");
  const alice = client("alice");
  const bob = client("bob");
  const seen = received(bob, room);
  await alice.join(room);
  await bob.join(room);
  let killedAt;
  const resumed = [];
  bob.on("resumed", () => resumed.push(Date.now()));
  const first = await sendThrough(alice, room, 60, 20, async () => {
    killedAt = Date.now();
    await cluster.stopNode(1, "SIGKILL");
  });
  await until("bob to resume", () => resumed.length > 0);
  figures.sigkill_to_resumed_ms = resumed[0] - killedAt;
  assert.equal(await cluster.owner(room), 2, "the room moved to the surviving node");
  await judge(room, first.sent, first.acks, seen);

  // Back in place: the room returns to node 1 (a handoff, 4001) and both resume again.
  const before = resumed.length;
  await cluster.startNode(1);
  await cluster.waitRing(2);
  const second = await sendThrough(alice, room, 30, 5, async () => {
    await until("the room to return to node 1", async () => (await cluster.owner(room)) === 1);
  });
  await until("bob to resume after the handoff", () => resumed.length > before);
  await judge(room, [...first.sent, ...second.sent], [...first.acks, ...second.acks], seen);
});

test("a graceful restart of the owner (SIGTERM) loses nothing and shows nothing twice", async () => {
  await cluster.waitRing(2);
  const room = await roomOwnedBy(cluster, 2, "term");
  const alice = client("alice");
  const bob = client("bob");
  const seen = received(bob, room);
  await alice.join(room);
  await bob.join(room);
  const resumed = [];
  bob.on("resumed", () => resumed.push(Date.now()));
  let termAt;
  const run = await sendThrough(alice, room, 50, 15, async () => {
    termAt = Date.now();
    await cluster.stopNode(2, "SIGTERM");
  });
  await until("bob to resume", () => resumed.length > 0);
  figures.sigterm_to_resumed_ms = resumed[0] - termAt;
  await judge(room, run.sent, run.acks, seen);
  await cluster.startNode(2);
  await cluster.waitRing(2);
});

test("the owner is paused (SIGSTOP): clients notice by heartbeat, resume elsewhere, and again after SIGCONT", async () => {
  await cluster.waitRing(2);
  const room = await roomOwnedBy(cluster, 2, "pause");
  const quick = { heartbeatMs: 500, heartbeatTimeoutMs: 1000, connectTimeoutMs: 3000 };
  const alice = client("alice", quick);
  const bob = client("bob", quick);
  const seen = received(bob, room);
  await alice.join(room);
  await bob.join(room);
  const resumed = [];
  bob.on("resumed", () => resumed.push(Date.now()));
  let stoppedAt;
  const first = await sendThrough(alice, room, 40, 10, async () => {
    stoppedAt = Date.now();
    cluster.signalNode(2, "SIGSTOP");
  });
  await until("bob to resume", () => resumed.length > 0, 60_000);
  figures.sigstop_to_resumed_ms = resumed[0] - stoppedAt;
  assert.equal(await cluster.owner(room), 1, "the room moved off the paused node");
  await judge(room, first.sent, first.acks, seen);

  // The paused node wakes up: it finds its lease gone, fences, registers again, and the
  // room returns to it (4001); nothing it held is served twice.
  const before = resumed.length;
  cluster.signalNode(2, "SIGCONT");
  await cluster.waitRing(2);
  const second = await sendThrough(alice, room, 20, 3, async () => {
    await until("the room to return to node 2", async () => (await cluster.owner(room)) === 2);
  });
  await until("bob to resume after SIGCONT", () => resumed.length > before, 60_000);
  await judge(room, [...first.sent, ...second.sent], [...first.acks, ...second.acks], seen);
});

test("an expiring token is renewed through getToken and the session resumes", async () => {
  const room = await roomOwnedBy(cluster, 1, "expiry");
  let asked = 0;
  // The first token ends in 2 s (plus the node's 5 s leeway): the session is closed with 4003.
  const carol = client("carol", { getToken: () => token("carol", ++asked === 1 ? 2 : 3600) });
  const closes = [];
  carol.on("error", (e) => e.closeCode && closes.push(e.closeCode));
  const resumed = new Promise((r) => carol.on("resumed", r));
  await carol.join(room);
  await resumed;
  assert.deepEqual(closes, [4003]);
  assert.equal(asked, 2);
  const ack = await carol.send(room, "still here");
  assert.equal(ack.duplicate, false);
});
