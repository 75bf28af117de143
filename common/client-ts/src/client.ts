// The chat client: one WebSocket through a router, rooms joined over it, and recovery that
// follows common/PROTOCOL.md: reconnect with backoff and jitter, rejoin every room with
// `since` = the last id delivered, resend every unacked message with its `cid`, and hand
// the app each message once, in order, across reconnects.

import { closeName, closeRetry, errorRetry, type Retry } from "./codes.js";
import { compareIds, type MessageId } from "./ids.js";

/** A stored message, live or replayed (PROTOCOL "message"). */
export interface ChatMessage {
  room: string;
  id: MessageId;
  from: string;
  cid: string;
  body: string;
  ts: number;
}

/** Another member's first connection joined the room, or its last one left. */
export interface PresenceEvent {
  room: string;
  user: string;
  event: "join" | "leave";
}

/** A send or publish made durable by the room's owner. */
export interface Ack {
  room: string;
  cid: string;
  id: MessageId;
  /** The `cid` had been accepted before: nothing new was stored or delivered. */
  duplicate: boolean;
}

/**
 * `idle` (nothing joined yet), `connecting` (first connection), `open`, `reconnecting`
 * (lost, waiting to try again or trying), `closed` (by `close()` or a refusal that must
 * not be retried).
 */
export type State = "idle" | "connecting" | "open" | "reconnecting" | "closed";

/** A refusal from a server, or the client's own (`client_closed`, `not_joined`). */
export class ChatError extends Error {
  readonly code: string;
  readonly retry: Retry;
  readonly room?: string;
  readonly cid?: string;
  /** The HTTP status, for refusals of HTTP requests and upgrades. */
  readonly status?: number;
  /** The WebSocket close code, for a connection ended by the server. */
  readonly closeCode?: number;

  constructor(
    code: string,
    message: string,
    extra: { room?: string; cid?: string; status?: number; closeCode?: number; retry?: Retry } = {},
  ) {
    super(`${code}: ${message}`);
    this.name = "ChatError";
    this.code = code;
    this.retry = extra.retry ?? errorRetry(code);
    this.room = extra.room;
    this.cid = extra.cid;
    this.status = extra.status;
    this.closeCode = extra.closeCode;
  }
}

/** What the client needs of a WebSocket: the browser's, or the `ws` package's in Node. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason?: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface ClientOptions {
  /** A router's address: `ws://host:port`, `wss://…`, or `http(s)://…` (same thing). */
  url: string;
  /** A JWT for the cluster. Sent as `?token=` on the upgrade (browsers cannot set headers). */
  token?: string;
  /**
   * Gives a fresh token when the session's token expires (close 4003) or an upgrade is
   * refused with 401. Without it, either ends the client (`closed`, an `error` event).
   */
  getToken?: () => string | Promise<string>;
  /** The user id for a cluster run with `--insecure-dev-auth` (development only). */
  user?: string;
  /** The WebSocket class. Defaults to the global one (browsers, Node 22+); in Node 20 pass `ws`. */
  WebSocket?: WebSocketConstructor;
  /** `fetch` for history, publish and reading upgrade refusals. Defaults to the global one. */
  fetch?: typeof fetch;
  /** Reconnect delays: full jitter over `minMs * 2^attempt`, capped at `maxMs`. */
  backoff?: { minMs?: number; maxMs?: number };
  /** An upgrade that has not opened after this long is abandoned and retried (default 10 s). */
  connectTimeoutMs?: number;
  /**
   * After this long without a frame, the client sends a `ping` (default 20 s; 0: never).
   * When `heartbeatTimeoutMs` (default 10 s) then passes without any frame, the connection
   * is taken for dead (a paused node, a cut network) and replaced.
   */
  heartbeatMs?: number;
  heartbeatTimeoutMs?: number;
  /** The random source for jitter and generated cids (tests make it deterministic). */
  random?: () => number;
}

export interface ClientEvents {
  message: ChatMessage;
  presence: PresenceEvent;
  /** Refusals that concern no pending call (and every one that does, for logging). */
  error: ChatError;
  state: State;
  /** `members`: users connected to the room (this one included); `users`: who, when few. */
  joined: { room: string; head?: MessageId; members: number; users?: string[] };
  /** After a reconnect, once every room is joined again (and its unacked sends resent). */
  resumed: { rooms: string[]; downMs: number };
}

type Listener<T> = (event: T) => void;

interface Room {
  /** The newest id handed to the app: `since` for the next join. */
  last?: MessageId;
  /**
   * The latest (sender, cid) pairs handed over. A node that crashes may deliver a message
   * it never stored; the sender's resend is then stored under a new id, and this keeps the
   * app from seeing it twice.
   */
  seen: Set<string>;
  joined: boolean;
  waiters: Array<{ resolve: (j: { room: string; head?: MessageId }) => void; reject: (e: ChatError) => void }>;
  leaving?: () => void;
  rejoinTimer?: ReturnType<typeof setTimeout>;
}

interface Pending {
  room: string;
  body: string;
  resolve: (a: Ack) => void;
  reject: (e: ChatError) => void;
  /** Retries after `retry_later` refusals, for their backoff. */
  refusals: number;
  timer?: ReturnType<typeof setTimeout>;
}

const OPEN = 1;
/** (sender, cid) pairs remembered per room to drop a crashed node's unstored copies. */
const SEEN_PER_ROOM = 4096;

/** A chat client. Create it, `join` rooms, `send`; it reconnects and resumes by itself. */
export class ChatClient {
  private readonly opts: ClientOptions;
  private readonly wsBase: string;
  private readonly httpBase: string;
  private readonly rooms = new Map<string, Room>();
  /** Rooms left and waiting for `left` (no longer in `rooms`). */
  private readonly leaving = new Map<string, Room>();
  private readonly pending = new Map<string, Pending>();
  private readonly listeners = new Map<keyof ClientEvents, Set<Listener<never>>>();
  private ws: WebSocketLike | null = null;
  private token?: string;
  private stateNow: State = "idle";
  private attempt = 0;
  private timer?: ReturnType<typeof setTimeout>;
  private downSince?: number;
  private cidCounter = 0;
  private readonly cidPrefix: string;

  constructor(options: ClientOptions) {
    this.opts = options;
    const base = options.url.replace(/\/+$/, "");
    this.wsBase = base.replace(/^http(s?):/, "ws$1:");
    this.httpBase = base.replace(/^ws(s?):/, "http$1:");
    if (!/^wss?:\/\//.test(this.wsBase)) {
      throw new TypeError(`url must be ws://, wss://, http:// or https://, not ${options.url}`);
    }
    this.token = options.token;
    this.cidPrefix = Math.floor(this.random() * 36 ** 8).toString(36);
  }

  /** The connection's state; changes are also `state` events. */
  get state(): State {
    return this.stateNow;
  }

  /** Subscribes to an event; returns the function that unsubscribes. */
  on<K extends keyof ClientEvents>(event: K, listener: Listener<ClientEvents[K]>): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(listener as Listener<never>);
    return () => set?.delete(listener as Listener<never>);
  }

  /**
   * Joins `room` (connecting first if needed). `since` (the last id the app has seen) asks
   * for every message after it. Resolves on `joined`; rejects on a refusal that must not
   * be retried (`forbidden`, `invalid_field`). The room stays joined across reconnects.
   */
  join(room: string, options: { since?: MessageId } = {}): Promise<{ room: string; head?: MessageId }> {
    if (this.stateNow === "closed") return Promise.reject(this.closedError());
    let r = this.rooms.get(room);
    if (!r) {
      r = { last: options.since, joined: false, waiters: [], seen: new Set() };
      this.rooms.set(room, r);
    } else if (r.joined) {
      return Promise.resolve({ room });
    }
    const joined = new Promise<{ room: string; head?: MessageId }>((resolve, reject) =>
      r.waiters.push({ resolve, reject }),
    );
    if (this.ws && this.ws.readyState === OPEN) {
      this.sendJoin(room);
    } else if (this.stateNow === "idle") {
      this.connect();
    }
    return joined;
  }

  /** Leaves `room`. Unacked sends to it are rejected with `not_joined`. */
  leave(room: string): Promise<void> {
    const r = this.rooms.get(room);
    if (!r) return Promise.resolve();
    this.rooms.delete(room);
    clearTimeout(r.rejoinTimer);
    const err = new ChatError("not_joined", `left ${room}`, { room, retry: "do_not_retry" });
    r.waiters.forEach((w) => w.reject(err));
    for (const [cid, p] of this.pending) {
      if (p.room === room) this.settle(cid)?.reject(new ChatError("not_joined", `left ${room}`, { room, cid }));
    }
    if (!this.ws || this.ws.readyState !== OPEN || !r.joined) return Promise.resolve();
    this.transmit({ type: "leave", room });
    return new Promise((resolve) => {
      // Answered with `left`; a connection lost meanwhile left the room as well.
      const timer = setTimeout(resolve, 5000);
      r.leaving = () => (clearTimeout(timer), resolve());
      this.leaving.set(room, r);
    });
  }

  /**
   * Sends `body` to `room` (joined, or being joined). Resolves with the stored id once the
   * owner made it durable. Until then the message is kept and resent, with the same
   * `cid`, after every reconnect and after `retry_later` refusals; it rejects only on a
   * refusal that must not be retried (`body_too_long`, `forbidden`, ...) or `close()`.
   */
  send(room: string, body: string, options: { cid?: string } = {}): Promise<Ack> {
    if (this.stateNow === "closed") return Promise.reject(this.closedError());
    const r = this.rooms.get(room);
    if (!r) return Promise.reject(new ChatError("not_joined", `join ${room} first`, { room }));
    const cid = options.cid ?? this.nextCid();
    const existing = this.pending.get(cid);
    if (existing) {
      return new Promise((resolve, reject) => {
        const prev = { resolve: existing.resolve, reject: existing.reject };
        existing.resolve = (a) => (prev.resolve(a), resolve(a));
        existing.reject = (e) => (prev.reject(e), reject(e));
      });
    }
    return new Promise((resolve, reject) => {
      this.pending.set(cid, { room, body, resolve, reject, refusals: 0 });
      if (r.joined) this.transmit({ type: "send", room, cid, body });
    });
  }

  /** Messages of `room` that have not been acked yet, by `cid`: what a reconnect resends. */
  unacked(room?: string): Array<{ room: string; cid: string; body: string }> {
    return [...this.pending]
      .filter(([, p]) => room === undefined || p.room === room)
      .map(([cid, p]) => ({ room: p.room, cid, body: p.body }));
  }

  /** Closes the connection for good; pending sends and joins are rejected. */
  close(): void {
    if (this.stateNow === "closed") return;
    this.fail(this.closedError(), 1000);
  }

  /**
   * One page of stored history, oldest first (PROTOCOL "GET /v1/rooms/{room}/messages"):
   * `before` pages back from an id (default: the newest), `after` pages forward.
   */
  async history(
    room: string,
    page: { before?: MessageId; after?: MessageId; limit?: number } = {},
  ): Promise<{ messages: ChatMessage[]; hasMore: boolean }> {
    const q = new URLSearchParams();
    if (page.before !== undefined) q.set("before", page.before);
    if (page.after !== undefined) q.set("after", page.after);
    if (page.limit !== undefined) q.set("limit", String(page.limit));
    const body = (await this.request("GET", room, q)) as { messages: ChatMessage[]; has_more: boolean };
    return { messages: body.messages, hasMore: body.has_more };
  }

  /**
   * Who is connected to the room across the cluster (PROTOCOL "GET /v1/rooms/{room}/presence"):
   * the number of users, and the first of them by name.
   */
  async presence(room: string): Promise<{ members: number; users: string[] }> {
    const body = (await this.request("GET", room, new URLSearchParams(), undefined, "presence")) as {
      members: number;
      users: string[];
    };
    return { members: body.members, users: body.users };
  }

  /**
   * Publishes over HTTP (bots, backends): the same ordering, delivery, ack and dedupe as
   * `send`, with no connection. `retry_later` refusals and network failures are retried
   * with the same `cid` up to `retries` times (default 3).
   */
  async publish(room: string, body: string, options: { cid?: string; retries?: number } = {}): Promise<Ack> {
    const cid = options.cid ?? this.nextCid();
    const retries = options.retries ?? 3;
    for (let attempt = 0; ; attempt++) {
      try {
        const ack = (await this.request("POST", room, new URLSearchParams(), { cid, body })) as Ack;
        return { room: ack.room, cid: ack.cid, id: ack.id, duplicate: ack.duplicate };
      } catch (e) {
        const retryable = !(e instanceof ChatError) || e.retry !== "do_not_retry";
        if (!retryable || attempt >= retries) throw e;
        await sleep(this.delay(attempt));
      }
    }
  }

  // --- connection -------------------------------------------------------------------

  private connect(): void {
    clearTimeout(this.timer);
    const first = this.rooms.keys().next();
    if (first.done) {
      this.setState("idle");
      return;
    }
    const room = first.value;
    this.setState(this.downSince === undefined ? "connecting" : "reconnecting");
    void this.authQuery().then(
      (auth) => this.open(room, auth),
      (e) => this.fail(new ChatError("unauthorized", `getToken failed: ${e}`)),
    );
  }

  private open(room: string, auth: URLSearchParams): void {
    if (this.stateNow === "closed") return;
    const q = new URLSearchParams({ room });
    const since = this.rooms.get(room)?.last;
    if (since !== undefined) q.set("since", since);
    auth.forEach((v, k) => q.set(k, v));
    const url = `${this.wsBase}/ws?${q}`;
    const Ctor = this.opts.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!Ctor) {
      this.fail(new ChatError("internal", "no WebSocket: pass options.WebSocket (the ws package in Node 20)"));
      return;
    }
    const ws = new Ctor(url);
    this.ws = ws;
    let opened = false;
    const openTimer = setTimeout(() => ws.close(), this.opts.connectTimeoutMs ?? 10_000);
    const interval = this.opts.heartbeatMs ?? 20_000;
    const timeout = this.opts.heartbeatTimeoutMs ?? 10_000;
    let heard = Date.now();
    let pinged: number | undefined;
    let beat: ReturnType<typeof setInterval> | undefined;
    const ended = () => {
      clearTimeout(openTimer);
      clearInterval(beat);
    };
    ws.onopen = () => {
      clearTimeout(openTimer);
      if (this.ws !== ws) return;
      opened = true;
      heard = Date.now();
      this.setState("open");
      // The upgrade joined `room`; the others are joined over the socket.
      for (const other of this.rooms.keys()) if (other !== room) this.sendJoin(other);
      if (interval > 0) {
        beat = setInterval(() => {
          if (this.ws !== ws) return ended();
          const now = Date.now();
          if (pinged !== undefined && now - pinged >= timeout) {
            // Nothing came back: the peer is gone without a close. Replace the socket.
            ended();
            this.ws = null;
            ws.onclose = ws.onmessage = null;
            const w = ws as WebSocketLike & { terminate?: () => void };
            if (w.terminate) w.terminate();
            else ws.close();
            void this.onClose(1006, true, url, room);
          } else if (pinged === undefined && now - heard >= interval) {
            pinged = now;
            this.transmit({ type: "ping" });
          }
        }, Math.max(50, Math.min(interval, timeout) / 4));
      }
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      heard = Date.now();
      pinged = undefined;
      this.onFrame(String(ev.data));
    };
    ws.onerror = () => {};
    ws.onclose = (ev) => {
      ended();
      if (this.ws !== ws) return;
      this.ws = null;
      void this.onClose(ev.code, opened, url, room);
    };
  }

  private async onClose(code: number, opened: boolean, url: string, room: string): Promise<void> {
    for (const r of this.leaving.values()) r.leaving?.();
    this.leaving.clear();
    for (const r of this.rooms.values()) {
      r.joined = false;
      clearTimeout(r.rejoinTimer);
    }
    if (this.stateNow === "closed") return;
    this.downSince ??= Date.now();
    let retry: Retry = closeRetry(code);
    let err: ChatError | undefined;
    if (!opened) {
      // A refused upgrade is only a failed connection to a WebSocket; ask over HTTP why.
      err = await this.probe(url);
      retry = err ? err.retry : "reconnect_and_resume";
      if (err?.code === "forbidden" || err?.code === "invalid_field") {
        // The first room is refused (not the connection): drop it, go on with the others.
        this.dropRoom(room, err);
        retry = "reconnect_and_resume";
      }
    } else if (code !== 1006) {
      err = new ChatError(closeName(code), `connection closed with ${code}`, { closeCode: code, retry });
    }
    const unauthorized = code === 4003 || err?.code === "unauthorized";
    if (unauthorized) {
      if (!this.opts.getToken) {
        this.fail(err ?? new ChatError("unauthorized", "token refused"));
        return;
      }
      this.token = undefined; // fetched again before the next attempt
      retry = "reconnect_and_resume";
    }
    if (err) this.emit("error", err);
    if (retry === "do_not_retry") {
      this.fail(err ?? new ChatError("internal", `closed with ${code}`));
      return;
    }
    this.setState("reconnecting");
    const wait = this.delay(this.attempt++, retry === "retry_later" ? 1000 : 0);
    this.timer = setTimeout(() => this.connect(), wait);
  }

  /**
   * The JSON refusal of a failed upgrade, read by repeating it as a plain GET. A 426 means
   * nothing was refused (only the upgrade is missing): the connection failed, and so does
   * a probe that gets no answer within the connect timeout.
   */
  private async probe(url: string): Promise<ChatError | undefined> {
    const f = this.opts.fetch ?? globalThis.fetch;
    if (!f) return undefined;
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), this.opts.connectTimeoutMs ?? 10_000);
    try {
      const resp = await f(url.replace(/^ws(s?):/, "http$1:"), { signal: abort.signal });
      const body = (await resp.json()) as { code?: string; message?: string };
      if (resp.status < 400 || resp.status === 426 || typeof body.code !== "string") return undefined;
      return new ChatError(body.code, body.message ?? "", { status: resp.status });
    } catch {
      return undefined; // unreachable, too slow or not JSON: a network failure, retried
    } finally {
      clearTimeout(timer);
    }
  }

  private async authQuery(): Promise<URLSearchParams> {
    const q = new URLSearchParams();
    if (this.token === undefined && this.opts.getToken) this.token = await this.opts.getToken();
    if (this.token !== undefined) q.set("token", this.token);
    else if (this.opts.user !== undefined) q.set("user", this.opts.user);
    return q;
  }

  // --- frames -----------------------------------------------------------------------

  private onFrame(text: string): void {
    let f: Record<string, unknown>;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    const room = typeof f.room === "string" ? f.room : undefined;
    const r = room === undefined ? undefined : this.rooms.get(room);
    switch (f.type) {
      case "joined": {
        if (!r || room === undefined) return;
        r.joined = true;
        const head = typeof f.head === "string" ? f.head : undefined;
        r.waiters.splice(0).forEach((w) => w.resolve({ room, head }));
        const members = typeof f.members === "number" ? f.members : 0;
        const users = Array.isArray(f.users) ? (f.users as string[]) : undefined;
        this.emit("joined", { room, head, members, users });
        for (const [cid, p] of this.pending) {
          if (p.room === room && p.timer === undefined) this.transmit({ type: "send", room, cid, body: p.body });
        }
        this.maybeResumed();
        return;
      }
      case "message": {
        const m = f as unknown as ChatMessage;
        if (!r || typeof m.id !== "string") return;
        // A replay after `since` starts past what was delivered; anything at or before
        // the last id handed over is a copy (a resent join's replay), never shown twice.
        if (r.last !== undefined && compareIds(m.id, r.last) <= 0) return;
        r.last = m.id;
        const key = `${m.from}\n${m.cid}`;
        if (r.seen.has(key)) return;
        r.seen.add(key);
        if (r.seen.size > SEEN_PER_ROOM) r.seen.delete(r.seen.values().next().value as string);
        this.emit("message", { room: m.room, id: m.id, from: m.from, cid: m.cid, body: m.body, ts: m.ts });
        return;
      }
      case "ack": {
        const cid = f.cid as string;
        const p = this.pending.get(cid);
        if (!p || p.room !== room) return;
        this.settle(cid)?.resolve({ room: p.room, cid, id: f.id as string, duplicate: f.duplicate === true });
        return;
      }
      case "presence":
        if (r) this.emit("presence", f as unknown as PresenceEvent);
        return;
      case "left":
        if (room !== undefined) {
          this.leaving.get(room)?.leaving?.();
          this.leaving.delete(room);
        }
        return;
      case "error":
        this.onError(f, room, r);
        return;
    }
  }

  private onError(f: Record<string, unknown>, room: string | undefined, r: Room | undefined): void {
    const code = String(f.code);
    const cid = typeof f.cid === "string" ? f.cid : undefined;
    const err = new ChatError(code, String(f.message ?? ""), { room, cid });
    this.emit("error", err);
    const p = cid === undefined ? undefined : this.pending.get(cid);
    if (p && cid !== undefined) {
      if (err.retry === "do_not_retry") {
        this.settle(cid)?.reject(err);
        return;
      }
      // retry_later backs off; room_moved and the like are resent soon on this
      // connection (a 4001 close, if it comes, resends on the next one).
      const wait = err.retry === "retry_later" ? this.delay(p.refusals++, 250) : 200;
      clearTimeout(p.timer);
      p.timer = setTimeout(() => {
        p.timer = undefined;
        const now = this.rooms.get(p.room);
        if (this.pending.get(cid) === p && now?.joined) this.transmit({ type: "send", room: p.room, cid, body: p.body });
      }, wait);
      return;
    }
    if (!r || room === undefined || cid !== undefined) return;
    // A join refused, or a replay that failed (`store_unavailable`: no longer a member).
    if (err.retry === "do_not_retry") {
      this.dropRoom(room, err);
      return;
    }
    r.joined = false;
    clearTimeout(r.rejoinTimer);
    r.rejoinTimer = setTimeout(() => {
      if (this.rooms.get(room) === r && this.ws?.readyState === OPEN) this.sendJoin(room);
    }, this.delay(this.attempt, 250));
  }

  private sendJoin(room: string): void {
    const since = this.rooms.get(room)?.last;
    this.transmit(since === undefined ? { type: "join", room } : { type: "join", room, since });
  }

  private transmit(frame: object): void {
    if (this.ws && this.ws.readyState === OPEN) this.ws.send(JSON.stringify(frame));
  }

  private maybeResumed(): void {
    for (const r of this.rooms.values()) if (!r.joined) return;
    this.attempt = 0;
    if (this.downSince !== undefined) {
      const downMs = Date.now() - this.downSince;
      this.downSince = undefined;
      this.emit("resumed", { rooms: [...this.rooms.keys()], downMs });
    }
  }

  // --- bookkeeping ------------------------------------------------------------------

  private dropRoom(room: string, err: ChatError): void {
    const r = this.rooms.get(room);
    if (!r) return;
    this.rooms.delete(room);
    r.waiters.forEach((w) => w.reject(err));
    for (const [cid, p] of this.pending) if (p.room === room) this.settle(cid)?.reject(err);
  }

  private settle(cid: string): Pending | undefined {
    const p = this.pending.get(cid);
    if (p) {
      clearTimeout(p.timer);
      this.pending.delete(cid);
    }
    return p;
  }

  private fail(err: ChatError, code?: number): void {
    clearTimeout(this.timer);
    const ws = this.ws;
    this.ws = null;
    this.setState("closed");
    if (ws && code !== undefined) ws.close(code);
    for (const room of [...this.rooms.keys()]) this.dropRoom(room, err);
    for (const cid of [...this.pending.keys()]) this.settle(cid)?.reject(err);
    if (err.code !== "client_closed") this.emit("error", err);
  }

  private closedError(): ChatError {
    return new ChatError("client_closed", "the client was closed", { retry: "do_not_retry" });
  }

  private setState(s: State): void {
    if (this.stateNow === s) return;
    this.stateNow = s;
    this.emit("state", s);
  }

  private emit<K extends keyof ClientEvents>(event: K, value: ClientEvents[K]): void {
    for (const l of this.listeners.get(event) ?? []) {
      try {
        (l as Listener<ClientEvents[K]>)(value);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  private nextCid(): string {
    return `c-${this.cidPrefix}-${(this.cidCounter++).toString(36)}`;
  }

  private random(): number {
    return (this.opts.random ?? Math.random)();
  }

  /** Full jitter: a random delay up to `minMs * 2^attempt` (capped), at least `floor`. */
  private delay(attempt: number, floor = 0): number {
    const min = this.opts.backoff?.minMs ?? 250;
    const max = this.opts.backoff?.maxMs ?? 10_000;
    const cap = Math.min(max, min * 2 ** Math.min(attempt, 20));
    return Math.max(floor, Math.round(this.random() * cap));
  }

  private async request(
    method: "GET" | "POST",
    room: string,
    q: URLSearchParams,
    json?: object,
    route = "messages",
  ): Promise<unknown> {
    const f = this.opts.fetch ?? globalThis.fetch;
    const headers: Record<string, string> = {};
    if (this.token === undefined && this.opts.getToken) this.token = await this.opts.getToken();
    if (this.token !== undefined) headers.authorization = `Bearer ${this.token}`;
    else if (this.opts.user !== undefined) q.set("user", this.opts.user);
    if (json) headers["content-type"] = "application/json";
    const qs = q.toString();
    const url = `${this.httpBase}/v1/rooms/${encodeURIComponent(room)}/${route}${qs ? `?${qs}` : ""}`;
    const resp = await f(url, { method, headers, body: json ? JSON.stringify(json) : undefined });
    const body = (await resp.json().catch(() => ({}))) as { code?: string; message?: string };
    if (!resp.ok) {
      throw new ChatError(body.code ?? "internal", body.message ?? `HTTP ${resp.status}`, {
        room,
        status: resp.status,
      });
    }
    return body;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
