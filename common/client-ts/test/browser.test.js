// A real browser (Debian's headless Chromium, driven by playwright-core) against a real
// local cluster: two demo pages chat, the room's owner is SIGKILLed and started again,
// both pages resume and show every stored message once; CORS and Origin from an allowed
// and a refused page. A screenshot is kept in test-artifacts/.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { Cluster, roomOwnedBy } from "./cluster.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
let cluster;
let browser;
const pages = [];
const sites = [];

/** A page server on its own port: another origin than the router's. */
function site() {
  return new Promise((resolve) => {
    const server = createServer((_, res) => res.end("<!doctype html><title>elsewhere</title>"));
    server.listen(0, "127.0.0.1", () => {
      sites.push(server);
      resolve(`http://127.0.0.1:${server.address().port}`);
    });
  });
}

let allowed;
let refused;

before(async () => {
  allowed = await site();
  refused = await site();
  const env = { CHAT_ALLOWED_ORIGINS: allowed };
  cluster = await Cluster.start(2, {
    devAuth: true,
    routerArgs: ["--serve-demo", path.join(here, "..", "demo")],
    env,
  });
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
});

after(async () => {
  await browser?.close();
  await cluster?.stop();
  sites.forEach((s) => s.close());
});

async function openDemo(room, user) {
  const page = await browser.newPage();
  page.on("pageerror", (e) => console.error(`[${user}] page error: ${e.message}`));
  pages.push(page);
  await page.goto(`${cluster.url}/demo/?room=${room}&user=${user}`);
  await page.waitForSelector("body[data-ready=true]", { timeout: 30_000 });
  return page;
}

async function say(page, body) {
  await page.fill("#body", body);
  await page.press("#body", "Enter");
}

/** The ids the page shows, top to bottom. */
const shown = (page) => page.$$eval("#messages li", (lis) => lis.map((li) => li.dataset.id));
const resumedCount = (page) => page.$eval("#resumed", (el) => Number(el.dataset.count));

async function until(what, cond, ms = 40_000) {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

test("two demo pages chat through a SIGKILL and a restart of the owner; each shows every message once", async (t) => {
  const room = await roomOwnedBy(cluster, 1, "browser");
  const ann = await openDemo(room, "ann");
  const ben = await openDemo(room, "ben");
  await ann.waitForSelector('#presence li[data-user="ben"]');
  const sent = [];
  const sayAll = async (tag) => {
    for (const [page, who] of [
      [ann, "ann"],
      [ben, "ben"],
    ]) {
      const body = `${who}-${tag}`;
      sent.push(body);
      await say(page, body);
    }
  };
  for (let i = 0; i < 3; i++) await sayAll(`before-${i}`);
  await until("both pages to show the first messages", async () => (await shown(ann)).length === 6 && (await shown(ben)).length === 6);

  const killedAt = Date.now();
  await cluster.stopNode(1, "SIGKILL");
  // Typed while the owner is gone: kept by the SDK and sent once the room is back.
  for (let i = 0; i < 2; i++) await sayAll(`during-${i}`);
  await until("both pages to resume", async () => (await resumedCount(ann)) >= 1 && (await resumedCount(ben)) >= 1);
  const resumedAt = Math.max(...(await Promise.all([ann, ben].map((p) => p.$eval("#resumed", (el) => Number(el.dataset.at))))));

  // The node comes back: the room returns to it (4001) and both pages resume again.
  await cluster.startNode(1);
  await until("both pages to resume on the restarted owner", async () => (await resumedCount(ann)) >= 2 && (await resumedCount(ben)) >= 2);
  assert.equal(await cluster.owner(room), 1);
  for (let i = 0; i < 2; i++) await sayAll(`after-${i}`);

  const stored = await cluster.stored(room);
  await until("every stored message on both pages", async () => (await shown(ann)).length >= sent.length && (await shown(ben)).length >= sent.length);
  assert.deepEqual(stored.map((m) => m.body).sort(), [...sent].sort(), "the store holds each typed message once");
  const ids = stored.map((m) => m.id);
  assert.deepEqual(await shown(ann), ids, "ann's page shows the store, once each, in order");
  assert.deepEqual(await shown(ben), ids, "ben's page shows the store, once each, in order");

  mkdirSync("test-artifacts", { recursive: true });
  await ann.screenshot({ path: "test-artifacts/browser-chat.png", fullPage: true });
  t.diagnostic(`SIGKILL of the owner to resumed on both pages: ${resumedAt - killedAt} ms`);
  writeFileSync(
    "test-artifacts/browser-figures.json",
    JSON.stringify({ sigkill_to_resumed_ms: resumedAt - killedAt }, null, 2),
  );
});

test("CORS and Origin: a listed page may read and connect; another is refused and writes nothing", async () => {
  const room = await roomOwnedBy(cluster, 2, "cors");
  const api = `${cluster.url}/v1/rooms/${room}/messages?user=web`;
  const ws = `${cluster.url.replace("http:", "ws:")}/ws?room=${room}&user=web`;
  const tryAll = (page) =>
    page.evaluate(
      async ({ api, ws }) => {
        const read = await fetch(api).then(
          (r) => `status ${r.status}`,
          (e) => `blocked: ${e.name}`,
        );
        const post = await fetch(api, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ cid: `p-${location.port}`, body: `json from ${location.origin}` }),
        }).then(
          (r) => `status ${r.status}`,
          (e) => `blocked: ${e.name}`,
        );
        // A simple request: no preflight, the browser sends it whatever CORS says.
        await fetch(api, {
          method: "POST",
          mode: "no-cors",
          headers: { "content-type": "text/plain" },
          body: JSON.stringify({ cid: `s-${location.port}`, body: `simple from ${location.origin}` }),
        }).catch(() => {});
        const socket = await new Promise((resolve) => {
          const s = new WebSocket(ws);
          s.onopen = () => (s.close(), resolve("open"));
          s.onerror = () => resolve("refused");
        });
        return { read, post, socket };
      },
      { api, ws },
    );
  const page = await browser.newPage();
  pages.push(page);
  await page.goto(allowed);
  assert.deepEqual(await tryAll(page), { read: "status 200", post: "status 201", socket: "open" });
  await page.goto(refused);
  assert.deepEqual(await tryAll(page), { read: "blocked: TypeError", post: "blocked: TypeError", socket: "refused" });
  const bodies = (await cluster.stored(room)).map((m) => m.body).sort();
  assert.deepEqual(bodies, [`json from ${allowed}`, `simple from ${allowed}`]);
});
