// A local cluster for the SDK's tests: chat-node and chat-router processes (the binaries
// `cargo test` built) on the real Redis and CQL server that deploy/local/test.sh started
// (CHAT_REDIS_URL, CHAT_CQL_NODES). Nothing is faked: a test that cannot reach them fails.
import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import path from "node:path";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const bin = (name, env) => process.env[env] ?? path.join(repo, "target", "debug", name);

export const SECRET = "sdk-test-secret-0123456789";

function required(name) {
  const v = process.env[name];
  if (!v) {
    throw new Error(`${name} is not set: run the suite with deploy/local/test.sh, which starts the real servers`);
  }
  return v;
}

/** An HS256 JWT for `sub`, valid for `seconds`. */
export function token(sub, seconds = 3600) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64({ sub, exp: Math.floor(Date.now() / 1000) + seconds });
  const sig = createHmac("sha256", SECRET).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** Starts a process and resolves with its `addr` once it logs one (JSON logs). */
function start(file, args, env) {
  const child = spawn(file, args, {
    env: { ...process.env, ...env, CHAT_LOG_FORMAT: "json" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${file} logged no address in 60 s`)), 60_000);
    child.on("error", (e) => reject(new Error(`cannot start ${file}: ${e.message} (build it with cargo test)`)));
    child.on("exit", (code, sig) => reject(new Error(`${file} exited (${code ?? sig}) before listening`)));
    const lines = createInterface({ input: child.stdout });
    lines.on("line", (line) => {
      let v;
      try {
        v = JSON.parse(line);
      } catch {
        return;
      }
      const addr = v?.fields?.addr;
      if (typeof addr === "string" && /listening/.test(v?.fields?.message ?? "")) {
        clearTimeout(timer);
        child.removeAllListeners("exit");
        resolve({ child, addr });
      }
    });
  });
}

/** A cluster of `nodes` chat-nodes and one router, in a Redis prefix of its own. */
export class Cluster {
  constructor() {
    this.prefix = `sdk-${randomBytes(4).toString("hex")}`;
    this.nodes = new Map();
    this.redis = required("CHAT_REDIS_URL");
    this.cql = required("CHAT_CQL_NODES");
  }

  /**
   * `devAuth`: nodes take `?user=` (as the local cluster does) instead of JWTs.
   * `routerArgs`: extra router flags. `env`: extra settings for routers and nodes.
   */
  static async start(nodes = 2, { devAuth = false, routerArgs = [], env = {} } = {}) {
    const c = new Cluster();
    c.auth = devAuth ? ["--insecure-dev-auth"] : ["--jwt-secret", SECRET];
    c.env = env;
    for (let id = 1; id <= nodes; id++) await c.startNode(id);
    const { child, addr } = await start(
      bin("chat-router", "CHAT_ROUTER_BIN"),
      ["--listen", "127.0.0.1:0", ...routerArgs],
      { ...env, CHAT_REDIS_URL: c.redis, CHAT_REDIS_PREFIX: c.prefix, CHAT_MEMBERSHIP_TTL: "2s" },
    );
    c.router = child;
    c.url = `http://${addr}`;
    await c.waitRing(nodes);
    return c;
  }

  /** Starts node `id` (again, after a kill: on the port it had, so its address is the same). */
  async startNode(id) {
    const listen = this.nodes.get(id)?.addr ?? "127.0.0.1:0";
    const { child, addr } = await start(
      bin("chat-node", "CHAT_NODE_BIN"),
      ["--listen", listen, "--node-id", String(id), ...this.auth],
      {
        ...this.env,
        CHAT_REDIS_URL: this.redis,
        CHAT_REDIS_PREFIX: this.prefix,
        CHAT_MEMBERSHIP_TTL: "2s",
        CHAT_CQL_NODES: this.cql,
        CHAT_CQL_KEYSPACE: "chat_sdk_tests",
        CHAT_SHUTDOWN_GRACE: "5s",
      },
    );
    this.nodes.set(id, { child, addr });
    return addr;
  }

  /** SIGKILLs (or SIGTERMs and waits for) node `id`. */
  async stopNode(id, signal = "SIGKILL") {
    const n = this.nodes.get(id);
    if (!n?.child || n.child.exitCode !== null) return;
    const exited = new Promise((r) => n.child.once("exit", r));
    n.child.kill(signal);
    await exited;
    n.child = null;
  }

  /** Sends `signal` (SIGSTOP, SIGCONT) to node `id`. */
  signalNode(id, signal) {
    this.nodes.get(id)?.child?.kill(signal);
  }

  /** The id of the node that owns `room` now, as the router sees it. */
  async owner(room) {
    const r = await fetch(`${this.url}/v1/rooms/${room}/owner`);
    if (!r.ok) throw new Error(`owner of ${room}: HTTP ${r.status}`);
    return (await r.json()).node.id;
  }

  async waitRing(n, ms = 30_000) {
    const end = Date.now() + ms;
    for (;;) {
      const r = await fetch(`${this.url}/readyz`).catch(() => null);
      if (r?.ok && (await r.json()).ring_size === n) return;
      if (Date.now() > end) throw new Error(`the router did not see ${n} nodes within ${ms} ms`);
      await new Promise((res) => setTimeout(res, 100));
    }
  }

  /** The room's stored history read back from the owner (through the router), oldest first. */
  async stored(room) {
    const all = [];
    let after;
    for (;;) {
      const q = new URLSearchParams({ limit: "1000", user: "reader" });
      if (after) q.set("after", after);
      const r = await fetch(`${this.url}/v1/rooms/${room}/messages?${q}`, {
        headers: this.auth[0] === "--jwt-secret" ? { authorization: `Bearer ${token("reader")}` } : {},
      });
      if (!r.ok) throw new Error(`history of ${room}: HTTP ${r.status} ${await r.text()}`);
      const page = await r.json();
      all.push(...page.messages);
      if (!page.has_more) return all;
      after = page.messages.at(-1).id;
    }
  }

  async stop() {
    this.router?.kill("SIGKILL");
    for (const id of this.nodes.keys()) this.signalNode(id, "SIGCONT");
    for (const id of this.nodes.keys()) await this.stopNode(id);
  }
}

/** A room name of its own for one test, owned by node `id` in the router's ring. */
export async function roomOwnedBy(cluster, id, stem) {
  for (let i = 0; i < 1000; i++) {
    const room = `${stem}-${cluster.prefix}-${i}`;
    if ((await cluster.owner(room)) === id) return room;
  }
  throw new Error(`no room of node ${id} found`);
}
