// The bot flow of seed 000 end to end: a customer writes in a support room, the cluster's
// webhook reaches examples/support-bot.mjs, the bot answers through the publish API with a
// cid derived from the message id. The bot is made to fail its first webhook after it has
// replied, so the cluster retries it: the store must still hold exactly one reply per
// customer message. Judged by the store (history API) and by what the customer's SDK saw.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import path from "node:path";
import WebSocket from "ws";
import { ChatClient } from "../dist/index.js";
import { Cluster, roomOwnedBy } from "./cluster.js";

const SECRET = "bot-webhook-secret-0123";
const here = path.dirname(fileURLToPath(import.meta.url));
let cluster;
let bot;
const botLines = [];
const clients = [];

/** A port the OS has just handed out (the nodes must know the bot's URL before it starts). */
function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

before(async () => {
  const port = await freePort();
  cluster = await Cluster.start(2, {
    devAuth: true,
    env: {
      CHAT_WEBHOOK_URL: `http://127.0.0.1:${port}/hook`,
      CHAT_WEBHOOK_SECRET: SECRET,
      CHAT_WEBHOOK_ROOMS: "support-",
      CHAT_WEBHOOK_BACKOFF: "100ms",
      CHAT_WEBHOOK_BACKOFF_MAX: "500ms",
    },
  });
  bot = spawn(process.execPath, [path.join(here, "../examples/support-bot.mjs")], {
    env: {
      ...process.env,
      BOT_PORT: String(port),
      BOT_SECRET: SECRET,
      CHAT_URL: cluster.url,
      BOT_ROOMS: "support-",
      BOT_FAIL_AFTER_REPLY: "1",
    },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const lines = createInterface({ input: bot.stdout });
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("the bot did not start in 10 s")), 10_000);
    bot.once("exit", (code) => reject(new Error(`the bot exited (${code})`)));
    lines.on("line", (line) => {
      botLines.push(line);
      if (line.includes('"listening"')) {
        clearTimeout(timer);
        resolve();
      }
    });
  });
});

after(async () => {
  for (const c of clients) c.close();
  bot?.kill("SIGTERM");
  await cluster?.stop();
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(what, cond, ms = 30_000) {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(50);
  }
}

test("the support bot answers each message once, even when its webhook is retried", async () => {
  const room = await roomOwnedBy(cluster, 1, "support");
  const customer = new ChatClient({ url: cluster.url, user: "customer", WebSocket, backoff: { minMs: 100, maxMs: 1000 } });
  clients.push(customer);
  const seen = [];
  customer.on("message", (m) => m.room === room && seen.push(m));
  await customer.join(room);
  const asks = ["I would like a refund", "what are your hours?", "hello"];
  const acks = [];
  for (const text of asks) acks.push(await customer.send(room, text));

  await until("a reply to every message", () => seen.filter((m) => m.from === "support-bot").length >= asks.length);
  // The first webhook was answered 500 after the reply was posted: the cluster sent it
  // again, and the bot posted again with the same cid — a duplicate, not a second reply.
  await until("the retried webhook", () => botLines.some((l) => l.includes('"duplicate":true')));

  const stored = await cluster.stored(room);
  const replies = stored.filter((m) => m.from === "support-bot");
  assert.equal(replies.length, asks.length, "one stored reply per customer message");
  assert.deepEqual(
    replies.map((m) => m.cid).sort(),
    acks.map((a) => `re-${a.id}`).sort(),
    "each reply's cid names the message it answers",
  );
  assert.ok(replies.find((m) => m.cid === `re-${acks[0].id}`).body.includes("Refunds"));
  assert.ok(replies.find((m) => m.cid === `re-${acks[1].id}`).body.includes("9:00"));
  // The customer saw exactly what the store holds, in its order.
  await until("the customer to see the whole room", () => seen.length >= stored.length);
  assert.deepEqual(
    seen.map((m) => m.id),
    stored.map((m) => m.id),
  );
  // The bot's own replies came back as webhooks and were ignored (no reply to a reply).
  await until("the bot to have seen its own replies", () =>
    replies.every((m) => botLines.some((l) => l.includes(`"ignored":"${m.id}"`))),
  );
  assert.equal((await cluster.stored(room)).length, stored.length);
});

test("a room that ends tells its members, and the SDK stops rejoining it", async () => {
  const room = await roomOwnedBy(cluster, 2, "support-end");
  const a = new ChatClient({ url: cluster.url, user: "ann", WebSocket, backoff: { minMs: 100, maxMs: 1000 } });
  clients.push(a);
  await a.join(room);
  const errors = [];
  a.on("error", (e) => errors.push(e));
  const presence = await a.presence(room);
  assert.deepEqual(presence, { members: 1, users: ["ann"] });
  const r = await fetch(`${cluster.url}/v1/rooms/${room}/end`, { method: "POST" });
  assert.equal(r.status, 200, await r.text());
  await until("the room_ended error", () => errors.some((e) => e.code === "room_ended" && e.room === room));
  await assert.rejects(a.send(room, "too late"), (e) => e.code === "room_ended" || e.code === "not_joined");
  const h = await a.history(room);
  assert.ok(Array.isArray(h.messages), "history stays readable");
});
