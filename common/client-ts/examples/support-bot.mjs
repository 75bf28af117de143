#!/usr/bin/env node
// A support bot on the cluster's webhooks (seed 000's bot that answers in the background):
// the cluster POSTs every stored message here; the bot checks the signature and answers by
// publishing to the room with a cid derived from the message id, so a webhook that comes
// again (a retry, an owner change) yields the same reply id, never a second reply.
// No dependencies: node >= 20.
//
//   CHAT_URL=http://127.0.0.1:8080 BOT_SECRET=... node examples/support-bot.mjs
//
// and start the nodes with --webhook-url http://127.0.0.1:8090/hook --webhook-secret ...
//
// Settings (environment): BOT_PORT (8090), BOT_SECRET (required: the nodes'
// --webhook-secret), CHAT_URL (a router), BOT_USER (support-bot; sent as ?user= to dev-auth
// clusters) or BOT_TOKEN (a JWT for BOT_USER), BOT_ROOMS (a room id prefix the bot serves;
// all rooms if unset), BOT_FAIL_AFTER_REPLY (answer 500 to the first N webhooks after
// replying, as a bot that crashes between its reply and its answer would: for the test).
import { createHmac, timingSafeEqual } from "node:crypto";
import { createServer } from "node:http";

const port = Number(process.env.BOT_PORT ?? 8090);
const secret = process.env.BOT_SECRET;
const chat = process.env.CHAT_URL ?? "http://127.0.0.1:8080";
const me = process.env.BOT_USER ?? "support-bot";
const token = process.env.BOT_TOKEN;
const rooms = process.env.BOT_ROOMS ?? "";
let failAfterReply = Number(process.env.BOT_FAIL_AFTER_REPLY ?? 0);
if (!secret) {
  console.error("BOT_SECRET is required (the nodes' --webhook-secret)");
  process.exit(64);
}

/** The cluster signs the raw body: X-Chat-Signature: sha256=<hex HMAC-SHA256>. */
function signedByTheCluster(raw, header) {
  const want = Buffer.from(`sha256=${createHmac("sha256", secret).update(raw).digest("hex")}`);
  const got = Buffer.from(String(header ?? ""));
  return got.length === want.length && timingSafeEqual(got, want);
}

/** What the bot says; a real one would ask a model or a ticket system. */
function answer(text) {
  const t = text.toLowerCase();
  if (t.includes("refund")) return "Refunds take 3-5 business days. I have opened a ticket for you.";
  if (t.includes("hours")) return "We are here 9:00-18:00 UTC, Monday to Friday.";
  return "Thanks for writing! An agent will be with you shortly.";
}

async function reply(msg) {
  const q = token ? "" : `?user=${encodeURIComponent(me)}`;
  const r = await fetch(`${chat}/v1/rooms/${encodeURIComponent(msg.room)}/messages${q}`, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      ...(token ? { authorization: `Bearer ${token}` } : {}),
    },
    // The same message id always gives the same cid: the room dedupes the second post.
    body: JSON.stringify({ cid: `re-${msg.id}`, body: answer(msg.body) }),
  });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(`publish: HTTP ${r.status} ${body.code ?? ""}`);
  return body;
}

const server = createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", async () => {
    const raw = Buffer.concat(chunks);
    const done = (status, body) => {
      res.writeHead(status, { "content-type": "application/json" });
      res.end(JSON.stringify(body));
    };
    if (req.method !== "POST" || !signedByTheCluster(raw, req.headers["x-chat-signature"])) {
      return done(401, { error: "not signed by the cluster" });
    }
    let msg;
    try {
      msg = JSON.parse(raw.toString("utf8"));
    } catch {
      return done(400, { error: "not JSON" });
    }
    // Its own replies come back as webhooks too; and only the rooms it serves.
    if (msg.type !== "message" || msg.from === me || !msg.room.startsWith(rooms)) {
      console.log(JSON.stringify({ ignored: msg.id, room: msg.room }));
      return done(200, { ignored: true });
    }
    try {
      const r = await reply(msg);
      console.log(JSON.stringify({ replied: msg.id, room: msg.room, id: r.id, duplicate: r.duplicate }));
    } catch (e) {
      // Not answered 2xx: the cluster retries, and the retry reposts with the same cid.
      console.error(`reply to ${msg.id} failed: ${e.message}`);
      return done(503, { error: e.message });
    }
    if (failAfterReply > 0) {
      failAfterReply--;
      return done(500, { error: "pretending to crash after replying" });
    }
    done(200, { ok: true });
  });
});

server.listen(port, "127.0.0.1", () => {
  console.log(JSON.stringify({ listening: `127.0.0.1:${server.address().port}`, chat }));
});
for (const sig of ["SIGTERM", "SIGINT"]) process.on(sig, () => server.close(() => process.exit(0)));
