/**
 * @tidings/client: a client of the tidings native websocket protocol (`/ws`).
 *
 * ```ts
 * import { Client } from "@tidings/client";
 *
 * const client = new Client("ws://127.0.0.1:8000/ws");
 * await client.connect();
 * const sub = await client.subscribe<{ text: string }>("chat/+");
 * await client.publish("chat/room1", { text: "hi" });
 * for await (const pub of sub) console.log(pub.channel, pub.offset, pub.data.text);
 * ```
 *
 * Design (it mirrors the Python `tidings.Client`):
 *
 * - One socket at a time. Every frame is dispatched synchronously as it
 *   arrives: replies settle the request with the same `id`; publications go to
 *   every subscription whose pattern matches the channel (once per
 *   subscription); messages, queue items and join/leave events to their own
 *   listeners and buffers.
 * - When the socket drops (and `close()` was not called), the client reconnects
 *   with exponential backoff and full jitter, re-subscribes every subscription
 *   and re-issues every `pull`. An exact channel subscribed with `recover`
 *   (the default) asks for what it missed from the last offset/epoch it saw;
 *   the replayed publications come first, then live ones, and the
 *   subscription reports whether the server could recover them
 *   (`"subscribed"` event, `sub.recovered`). Patterns cannot be recovered by
 *   the server; they are re-subscribed and report `recovered: false`.
 * - Every publication is delivered at most once per subscription and in
 *   order: an offset not above the last one seen on that channel in the same
 *   epoch is dropped; a jump is a gap that an exact recoverable subscription
 *   repairs by re-subscribing with `recover`; others count it in `sub.gaps`.
 * - With a token, it is sent in the first frame (`connect`), never in the URL.
 *   With `getToken`, a JWT is refreshed on the open connection before it
 *   expires (`refresh` frame), and a connection the server closed because its
 *   token expired or was refused is reopened with a fresh token.
 * - The server closing with 1008 (policy violation) is final unless it was
 *   about the token and `getToken` can provide a new one.
 *
 * No runtime dependencies. In browsers and Node >= 22 the global `WebSocket`
 * is used; on Node 20 pass one: `new Client(url, { WebSocket })` with
 * `import { WebSocket } from "ws"`.
 */

export const VERSION = "0.1.0";

// --- wire and public types ------------------------------------------------------------

/** A position in a channel's stream: the last offset seen and its epoch. */
export interface StreamPos {
  offset: number;
  epoch: string;
}

/** One publication of a channel. `data` is typed by the subscription. */
export interface Publication<T = unknown> {
  channel: string;
  data: T;
  offset: number;
  epoch: string;
  /** conn_id of the publishing connection (absent for server-side publishes) */
  sender?: string;
  /** server time of the publish, milliseconds since the Unix epoch */
  ts: number;
}

/** A direct message (`message` frame): `from` is the sender's conn_id or `"server"`. */
export interface Message<T = unknown> {
  from: string;
  data: T;
}

/** A connection present in a channel. */
export interface Member {
  conn_id: string;
  user: string | null;
  info?: unknown;
}

/** A `join` or `leave` event of a subscription made with `joinLeave: true`. */
export interface MemberEvent {
  kind: "join" | "leave";
  channel: string;
  conn_id: string;
  user: string | null;
}

/** A page of history and the channel's current position. */
export interface HistoryPage<T = unknown> {
  publications: Publication<T>[];
  offset: number;
  epoch: string;
  /** false when `since` was given but the history after it is gone (or the epoch changed) */
  recovered: boolean;
}

/** What a (re)subscription found, reported by the `"subscribed"` event. */
export interface SubscribedInfo {
  /** true when this subscribe re-established the subscription after a reconnect or gap */
  resubscribed: boolean;
  /** true when `recover` was asked for (exact channel with a known position) */
  recoverAsked: boolean;
  /** the server replayed every missed publication (false: some may be lost, or nothing was asked) */
  recovered: boolean;
  /** publications replayed by the server in this reply */
  replayed: number;
  /** the channel's position at subscribe time (0 and "" for patterns) */
  offset: number;
  epoch: string;
}

export type ConnectionState = "idle" | "connecting" | "connected" | "reconnecting" | "closed";

/** The part of the WebSocket API the client uses (browsers, Node 22, the `ws` package). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => any) | null;
  onmessage: ((ev: { data: unknown }) => any) | null;
  onclose: ((ev: { code: number; reason: string }) => any) | null;
  onerror: ((ev: any) => any) | null;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface Logger {
  debug(...args: unknown[]): void;
  info(...args: unknown[]): void;
  warn(...args: unknown[]): void;
}

export interface ClientOptions {
  /** a token (JWT) sent in the first frame; with `getToken`, its first value */
  token?: string;
  /** called for a fresh token: before the first connect without `token`, before a
   * JWT expires (refreshed on the open connection), and when the server refused or
   * expired the current one (then the client reconnects with the new token) */
  getToken?: () => string | Promise<string>;
  /** WebSocket constructor; default `globalThis.WebSocket` */
  WebSocket?: WebSocketConstructor;
  /** reconnect after a drop (default true) */
  reconnect?: boolean;
  /** backoff between attempts: random in [min, cap], cap doubling up to max (ms; 200, 10000) */
  backoffMin?: number;
  backoffMax?: number;
  /** bound of every request, and of waiting for the connection (ms; 10000) */
  requestTimeout?: number;
  /** per-subscription (and messages) buffer for async iteration (1000) */
  bufferSize?: number;
  /** refresh a JWT this many seconds before its `exp` (at most half its lifetime; 30);
   * false: never refresh on the open connection (the server's expiry close triggers a
   * reconnect with a fresh token instead) */
  refreshBefore?: number | false;
  /** send a `ping` every this many ms while connected (0: off, the default); a ping
   * without a pong within `requestTimeout` drops the socket and reconnects (a dead
   * link is noticed without waiting for TCP). Each round trip emits `"heartbeat"`. */
  heartbeat?: number;
  /** where warnings go; default: `console` for warnings only */
  logger?: Logger;
}

/** Options of `Client.subscribe`. */
export interface SubscribeOptions<T> {
  /** ask for `join`/`leave` events of the matching channels */
  joinLeave?: boolean;
  /** exact channels: replay missed publications from history after a reconnect or gap (true) */
  recover?: boolean;
  /** callback style: called for every publication; the subscription then does not
   * buffer for async iteration */
  onPublication?: (pub: Publication<T>) => void;
  onJoin?: (event: MemberEvent) => void;
  onLeave?: (event: MemberEvent) => void;
  /** every (re)subscription's result, e.g. whether missed publications were recovered */
  onSubscribed?: (info: SubscribedInfo) => void;
}

// --- generated channel types ----------------------------------------------------------

/** A map from channel pattern to the type of its data, e.g. as generated by
 * `tidings typescript --app ...`: `{ "orders/+": OrderUpdate; "chat/#": ChatLine }`. */
export type ChannelMap = object;

type Level<S extends string> = S extends "+" | "#" ? string : S;
/** The template literal type of the channels a pattern matches (`orders/+` -> `orders/${string}`). */
export type PatternTemplate<P extends string> = P extends `${infer Head}/${infer Rest}`
  ? `${Level<Head>}/${PatternTemplate<Rest>}`
  : Level<P>;

type Matching<M extends ChannelMap, C extends string> = {
  [K in keyof M & string]: C extends K ? M[K] : C extends PatternTemplate<K> ? M[K] : never;
}[keyof M & string];
// (an interface works as a map: `ChannelMap` is any object type, its keys the patterns)

/** The data type of channel (or pattern) `C` in the map `M`; `unknown` when none matches. */
export type DataOf<M extends ChannelMap, C extends string> = [Matching<M, C>] extends [never]
  ? unknown
  : Matching<M, C>;

declare const auto: unique symbol;
/** Marker default of type parameters: "take the type from the channel map". */
export interface Auto {
  readonly [auto]: true;
}
type Resolve<T, M extends ChannelMap, C extends string> = [T] extends [Auto] ? DataOf<M, C> : T;

// --- errors ---------------------------------------------------------------------------

/** Everything the client throws is a `ClientError`. */
export class ClientError extends Error {
  override name = "ClientError";
}

/** The client was closed (by `close()`). */
export class ClientClosedError extends ClientError {
  override name = "ClientClosedError";
}

/** A request got no reply, or the client was not connected, in time. */
export class ClientTimeoutError extends ClientError {
  override name = "ClientTimeoutError";
}

/** The server answered a request with an `error` frame; the connection stays open. */
export class ReplyError extends ClientError {
  override name = "ReplyError";
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(`${code}: ${message}`);
  }
}

/** The connection was closed by the server (or the network), with its close code. */
export class ConnectionClosedError extends ClientError {
  override name = "ConnectionClosedError";
  constructor(
    readonly code: number,
    readonly reason: string,
    message?: string,
  ) {
    super(message ?? `connection closed (code ${code}${reason ? `, ${reason}` : ""})`);
  }
}

// --- small pieces ---------------------------------------------------------------------

const OPEN = 1;
const CLOSED = 3;
const POLICY_VIOLATION = 1008;
const TRY_AGAIN_LATER = 1013;
const MAX_TRACKED_CHANNELS = 10_000;
const MAX_AUTH_FAILURES = 3; // consecutive token refusals before giving up

const quietLogger: Logger = {
  debug() {},
  info() {},
  warn(...args: unknown[]) {
    console.warn("[tidings]", ...args);
  },
};

/** MQTT-style match of a channel against a pattern (`+` one level, `#` the rest;
 * a wildcard first level never matches a `$` channel). */
export function patternMatches(pattern: string, channel: string): boolean {
  if (pattern === channel) return true;
  if (!pattern.includes("+") && !pattern.includes("#")) return false;
  const p = pattern.split("/");
  const c = channel.split("/");
  if (channel.startsWith("$") && (p[0] === "+" || p[0] === "#")) return false;
  for (let i = 0; i < p.length; i++) {
    const level = p[i];
    if (level === "#") return true;
    if (i >= c.length) return false;
    if (level !== "+" && level !== c[i]) return false;
  }
  return p.length === c.length;
}

function isPattern(name: string): boolean {
  return name.includes("+") || name.includes("#");
}

function base64UrlDecode(part: string): string {
  const b64 = part.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (part.length % 4)) % 4);
  const binary = atob(b64);
  const bytes = Uint8Array.from(binary, (ch) => ch.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}

/** The `exp` claim (seconds) of a JWT, or undefined when it is not a JWT or has none.
 * Read without verifying: only to know when to refresh. */
export function tokenExpiry(token: string): number | undefined {
  const parts = token.split(".");
  if (parts.length !== 3 || !parts[1]) return undefined;
  try {
    const claims: unknown = JSON.parse(base64UrlDecode(parts[1]));
    if (claims !== null && typeof claims === "object") {
      const exp = (claims as Record<string, unknown>).exp;
      if (typeof exp === "number" && Number.isFinite(exp)) return exp;
    }
  } catch {
    // not a JWT: no expiry known
  }
  return undefined;
}

function frameText(data: unknown): string {
  if (typeof data === "string") return data;
  if (data instanceof ArrayBuffer) return new TextDecoder().decode(new Uint8Array(data));
  if (ArrayBuffer.isView(data)) {
    return new TextDecoder().decode(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
  }
  return String(data);
}

function toPublication<T>(raw: unknown): Publication<T> {
  if (raw === null || typeof raw !== "object") throw new TypeError("a publication must be an object");
  const r = raw as Record<string, unknown>;
  if (typeof r.channel !== "string" || typeof r.offset !== "number") {
    throw new TypeError("a publication needs a string channel and a numeric offset");
  }
  const pub: Publication<T> = {
    channel: r.channel,
    data: r.data as T,
    offset: r.offset,
    epoch: typeof r.epoch === "string" ? r.epoch : "",
    ts: typeof r.ts === "number" ? r.ts : 0,
  };
  if (typeof r.sender === "string") pub.sender = r.sender;
  return pub;
}

type Handler<A> = (arg: A) => void;

/** A minimal typed event emitter (no dependency on Node's or the DOM's). */
class Emitter<Events> {
  private handlers = new Map<keyof Events, Set<Handler<any>>>();
  protected logger: Logger = quietLogger;

  /** Add a listener; returns a function that removes it. */
  on<K extends keyof Events>(event: K, handler: Handler<Events[K]>): () => void {
    let set = this.handlers.get(event);
    if (set === undefined) this.handlers.set(event, (set = new Set()));
    set.add(handler);
    return () => this.off(event, handler);
  }

  off<K extends keyof Events>(event: K, handler: Handler<Events[K]>): void {
    this.handlers.get(event)?.delete(handler);
  }

  protected emit<K extends keyof Events>(event: K, arg: Events[K]): void {
    const set = this.handlers.get(event);
    if (set === undefined) return;
    for (const handler of [...set]) {
      try {
        handler(arg);
      } catch (err) {
        this.logger.warn(`a ${String(event)} listener threw`, err);
      }
    }
  }
}

/** A bounded FIFO with async iteration; closing keeps what is buffered (it is still
 * yielded), then ends the iteration, or throws `error` when one was given. */
class Inbox<T> implements AsyncIterableIterator<T> {
  private items: T[] = [];
  private head = 0;
  private waiters: { resolve: (r: IteratorResult<T>) => void; reject: (e: unknown) => void }[] = [];
  private closed = false;
  private error: ClientError | undefined;

  constructor(readonly size: number | undefined) {}

  get length(): number {
    return this.items.length - this.head;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  full(): boolean {
    return this.size !== undefined && this.length >= this.size;
  }

  put(item: T): void {
    if (this.closed) return;
    const waiter = this.waiters.shift();
    if (waiter !== undefined) {
      waiter.resolve({ value: item, done: false });
      return;
    }
    this.items.push(item);
  }

  /** Put `item`; true if the oldest had to go to make room. */
  putDroppingOldest(item: T): boolean {
    const dropped = this.full();
    if (dropped) this.shift();
    this.put(item);
    return dropped;
  }

  private shift(): T | undefined {
    if (this.head >= this.items.length) return undefined;
    const item = this.items[this.head] as T;
    this.head++;
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return item;
  }

  clear(): void {
    this.items = [];
    this.head = 0;
  }

  close(error?: ClientError): void {
    if (this.closed) return;
    this.closed = true;
    this.error = error;
    if (this.length === 0) {
      for (const waiter of this.waiters.splice(0)) {
        if (error !== undefined) waiter.reject(error);
        else waiter.resolve({ value: undefined, done: true });
      }
    }
  }

  next(): Promise<IteratorResult<T>> {
    if (this.length > 0) return Promise.resolve({ value: this.shift() as T, done: false });
    if (this.closed) {
      return this.error !== undefined
        ? Promise.reject(this.error)
        : Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  /** `break` out of a `for await`: stop waiting (the buffer stays). */
  return(): Promise<IteratorResult<T>> {
    for (const waiter of this.waiters.splice(0)) waiter.resolve({ value: undefined, done: true });
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator](): AsyncIterableIterator<T> {
    return this;
  }
}

interface Pending {
  resolve: (value: any) => void;
  reject: (err: unknown) => void;
  onResult?: ((result: any) => void) | undefined;
  onError?: ((err: ReplyError) => void) | undefined;
}

// --- subscription ---------------------------------------------------------------------

export interface SubscriptionEvents<T> {
  publication: Publication<T>;
  join: MemberEvent;
  leave: MemberEvent;
  subscribed: SubscribedInfo;
  /** publications known to be lost (not recoverable) */
  gap: { channel: string; from: number; to: number; reason: string };
  /** the subscription ended: unsubscribed, refused on re-subscribe, or the client stopped */
  end: { error?: ClientError };
}

/**
 * One subscription to a channel or an MQTT-style pattern (`chat/+`, `orders/#`).
 *
 * Iterate it (`for await (const pub of sub)`) or listen (`sub.on("publication", ...)`,
 * or the `onPublication` option, which turns buffering off). Join/leave events come
 * as `"join"`/`"leave"` events (with `joinLeave: true`), so the iterated stream keeps
 * one type. Counters: `dropped` (oldest publications dropped from a full buffer),
 * `gaps` (publications known lost), `recoveries` (re-syncs from history after a gap
 * or a full buffer).
 */
export class Subscription<T = unknown>
  extends Emitter<SubscriptionEvents<T>>
  implements AsyncIterable<Publication<T>>
{
  readonly pattern: string;
  readonly joinLeave: boolean;
  readonly recover: boolean;
  dropped = 0;
  gaps = 0;
  recoveries = 0;
  /** the last (re)subscription's result; undefined before the first reply */
  lastSubscribed: SubscribedInfo | undefined;

  /** @internal */ _active = false;
  /** @internal */ _resyncInflight = false;
  /** @internal */ _confirmed = false;
  private readonly client: Client<any>;
  private readonly exact: boolean;
  private readonly inbox: Inbox<Publication<T>> | undefined;
  private readonly positions = new Map<string, StreamPos>();
  private recovering = false;
  private warnedFull = false;
  private subscribedOnce = false;

  /** @internal use `client.subscribe()` */
  constructor(client: Client<any>, pattern: string, options: SubscribeOptions<T>, bufferSize: number, logger: Logger) {
    super();
    this.client = client;
    this.logger = logger;
    this.pattern = pattern;
    this.joinLeave = options.joinLeave ?? false;
    this.recover = options.recover ?? true;
    this.exact = !isPattern(pattern);
    this.inbox = options.onPublication === undefined ? new Inbox(bufferSize) : undefined;
    if (options.onPublication) this.on("publication", options.onPublication);
    if (options.onJoin) this.on("join", options.onJoin);
    if (options.onLeave) this.on("leave", options.onLeave);
    if (options.onSubscribed) this.on("subscribed", options.onSubscribed);
  }

  /** True between a successful subscribe and `unsubscribe()` (or the client's end). */
  get active(): boolean {
    return this._active;
  }

  /** Whether the last (re)subscription recovered what was missed (see `SubscribedInfo`). */
  get recovered(): boolean | undefined {
    return this.lastSubscribed?.recovered;
  }

  /** For an exact channel: the position recovery resumes from. */
  get position(): StreamPos | undefined {
    return this.exact ? this.positions.get(this.pattern) : undefined;
  }

  /** @internal */ get _recoverable(): boolean {
    return this.exact && this.recover;
  }

  [Symbol.asyncIterator](): AsyncIterator<Publication<T>> {
    const inbox = this.inbox;
    if (inbox === undefined) {
      throw new ClientError("this subscription has an onPublication callback: it does not buffer for iteration");
    }
    return {
      next: async () => {
        const result = await inbox.next();
        this.maybeResync();
        return result;
      },
      return: () => inbox.return(),
    };
  }

  /** Stop the subscription (the server stops sending); iteration ends after the buffer. */
  async unsubscribe(): Promise<void> {
    const wasActive = this._active;
    this._deactivate();
    if (wasActive) await this.client._unsubscribe(this.pattern);
  }

  // -- called by the client, synchronously and in frame order --

  /** @internal */ _deactivate(error?: ClientError): void {
    if (!this._active && this.inbox?.isClosed !== false) return;
    this._active = false;
    this.client._forget(this);
    this.inbox?.close(error);
    this.emit("end", error === undefined ? {} : { error });
  }

  /** @internal */ _recoverFrom(): StreamPos | undefined {
    return this._recoverable ? this.positions.get(this.pattern) : undefined;
  }

  /** @internal */ _offer(pub: Publication<T>): void {
    if (!this._active || this.recovering) return; // a recover reply replays what is skipped here
    const channel = pub.channel;
    const last = this.positions.get(channel);
    if (last !== undefined) {
      if (last.epoch === pub.epoch) {
        if (pub.offset <= last.offset) return; // seen already (replay overlapping live)
        if (pub.offset > last.offset + 1) {
          if (this._recoverable) {
            this._beginRecovery(`offsets ${last.offset + 1}-${pub.offset - 1} missing`);
            return;
          }
          this.gaps++;
          this.emit("gap", { channel, from: last.offset + 1, to: pub.offset - 1, reason: "missing offsets" });
        }
      } else {
        this.gaps++;
        this.emit("gap", { channel, from: last.offset + 1, to: pub.offset - 1, reason: "epoch changed" });
      }
    }
    const inbox = this.inbox;
    if (inbox !== undefined) {
      if (inbox.full()) {
        if (this._recoverable) {
          this._beginRecovery("buffer full");
          return;
        }
        inbox.putDroppingOldest(pub);
        this.dropped++;
        if (!this.warnedFull) {
          this.warnedFull = true;
          this.logger.warn(`subscription ${this.pattern}: buffer of ${inbox.size} full, dropping the oldest publications`);
        }
      } else {
        this.warnedFull = false;
        inbox.put(pub);
      }
    }
    if (!this.positions.has(channel) && this.positions.size >= MAX_TRACKED_CHANNELS) {
      const oldest = this.positions.keys().next();
      if (!oldest.done) this.positions.delete(oldest.value);
    }
    this.positions.set(channel, { offset: pub.offset, epoch: pub.epoch });
    this.emit("publication", pub);
  }

  /** @internal */ _event(event: MemberEvent): void {
    if (this._active) this.emit(event.kind, event);
  }

  /** @internal */ _beginRecovery(why: string): void {
    if (!this.recovering) {
      this.recovering = true;
      this.recoveries++;
      this.logger.info(`subscription ${this.pattern}: ${why}; recovering from history`);
    }
    this.maybeResync();
  }

  private maybeResync(): void {
    const inbox = this.inbox;
    const room = inbox === undefined || inbox.length <= Math.floor((inbox.size ?? 0) / 2);
    if (this.recovering && this._active && !this._resyncInflight && room) this.client._resync(this);
  }

  /** @internal */ _onSubscribed(sentRecover: boolean, result: unknown, abandoned?: StreamPos): void {
    this._resyncInflight = false;
    if (!this._active) return;
    if (result === null || typeof result !== "object") throw new TypeError("a subscribe result must be an object");
    const r = result as Record<string, unknown>;
    this.recovering = false;
    if (abandoned !== undefined) {
      const top = typeof r.offset === "number" ? r.offset : abandoned.offset;
      this.gaps++;
      this.positions.delete(this.pattern); // continue from the channel's current position
      this.emit("gap", { channel: this.pattern, from: abandoned.offset + 1, to: top, reason: "recovery abandoned: too large for the server's outbox" });
    }
    const replayed = Array.isArray(r.publications) ? r.publications : [];
    for (const raw of replayed) this._offer(toPublication<T>(raw));
    const recovered = sentRecover && r.recovered === true;
    if (sentRecover && !recovered) {
      this.gaps++;
      const last = this.positions.get(this.pattern);
      const top = typeof r.offset === "number" ? r.offset : 0;
      this.emit("gap", { channel: this.pattern, from: (last?.offset ?? 0) + 1, to: top,
        reason: "not recovered: history too short or reset, or more than one reply may carry" });
      this.logger.warn(`subscription ${this.pattern}: missed publications could not be recovered (history too short or reset)`);
    }
    const offset = typeof r.offset === "number" ? r.offset : 0;
    const epoch = typeof r.epoch === "string" ? r.epoch : "";
    if (this.exact && !this.recovering && epoch) {
      // live publications continue after the channel's position at subscribe time
      const last = this.positions.get(this.pattern);
      if (last === undefined || last.epoch !== epoch || last.offset < offset) {
        this.positions.set(this.pattern, { offset, epoch });
      }
    }
    const info: SubscribedInfo = {
      resubscribed: this.subscribedOnce,
      recoverAsked: sentRecover,
      recovered,
      replayed: replayed.length,
      offset,
      epoch,
    };
    this.subscribedOnce = true;
    this._confirmed = true;
    this.lastSubscribed = info;
    this.emit("subscribed", info);
  }

  /** @internal */ _onSubscribeError(err: ReplyError): void {
    this._resyncInflight = false;
    if (!this._active) return;
    if (!this._confirmed) {
      this._deactivate(err); // the first subscribe: subscribe() rejects with it
      return;
    }
    this.logger.warn(`subscription ${this.pattern} refused on re-subscribe: ${err.message}`);
    this._deactivate(new ClientError(`subscription ${this.pattern} ended: ${err.message}`));
  }
}

// --- queue items ----------------------------------------------------------------------

/**
 * A work-queue item handed to this client; settle it with `ack()` or `nack()`.
 * Items belong to the connection that received them: if it drops, the server hands
 * them out again (at least once), so settling an item of a lost connection throws.
 */
export class Item<T = unknown> {
  /** @internal */
  constructor(
    private readonly client: Client<any>,
    readonly queue: string,
    readonly id: string,
    readonly data: T,
    readonly attempt: number,
    /** @internal */ readonly _generation: number,
  ) {}

  /** Done: the server removes the item from the queue. */
  ack(): Promise<void> {
    return this.client._settle(this, { type: "ack", queue: this.queue, item: this.id });
  }

  /** Give the item back (redelivered after `delay` seconds) or, with `requeue: false`, drop it. */
  nack(delay = 0, options: { requeue?: boolean } = {}): Promise<void> {
    if (!(delay >= 0)) throw new RangeError("delay must be >= 0");
    return this.client._settle(this, {
      type: "nack",
      queue: this.queue,
      item: this.id,
      delay,
      requeue: options.requeue ?? true,
    });
  }
}

// --- client ---------------------------------------------------------------------------

export interface ClientEvents {
  state: ConnectionState;
  /** connected (again) and every subscription and pull restored */
  connected: { connId: string; node: string; user: string | null; reconnect: boolean };
  disconnected: { code: number; reason: string; willReconnect: boolean };
  /** the next reconnection attempt is due in `delay` ms (attempt counts from 1) */
  reconnecting: { attempt: number; delay: number };
  /** a heartbeat ping's round trip, in ms (with the `heartbeat` option) */
  heartbeat: { rtt: number };
  /** a direct message to this client (from `send` or the server) */
  message: Message<unknown>;
  /** the server dropped publications for this slow client */
  lagged: { dropped: number };
  /** the token was refreshed on the open connection */
  refreshed: { expires: number | null };
  /** a background failure (a refresh refused, a reconnect attempt failed); informative */
  error: ClientError;
  /** stopped for good: `close()` (no error) or a final failure */
  closed: { error?: ClientError };
}

/**
 * Client of the tidings native protocol: pub/sub with recovery, direct messages,
 * presence, history and work queues over one websocket, reconnecting on its own.
 *
 * `M` maps channel patterns to data types (e.g. generated by `tidings typescript`),
 * so `subscribe("orders/+")` and `publish("orders/1", ...)` are typed from it; an
 * explicit type argument (`subscribe<Order>("orders/+")`) always wins.
 */
export class Client<M extends ChannelMap = Record<string, unknown>> extends Emitter<ClientEvents> {
  readonly url: string;
  /** publications the server said it dropped for this client (`lagged` frames) */
  lagged = 0;
  reconnects = 0;

  private readonly options: Required<Pick<ClientOptions, "reconnect" | "backoffMin" | "backoffMax" | "requestTimeout" | "bufferSize">>;
  private readonly WS: WebSocketConstructor;
  private readonly getToken: (() => string | Promise<string>) | undefined;
  private readonly refreshBefore: number | false;
  private readonly heartbeat: number;
  private heartbeatTimer: ReturnType<typeof setInterval> | undefined;
  private token: string | undefined;
  private tokenStale = false;
  private authFailures = 0;
  private _state: ConnectionState = "idle";
  private ws: WebSocketLike | undefined;
  private opening: WebSocketLike | undefined; // a socket waiting for its welcome
  private linkUp = false;
  private ready = false;
  private readyWaiters = new Set<() => void>();
  private stopped = false;
  private error: ClientError | undefined;
  private started = false;
  private generation = 0;
  private nextId = 0;
  private attempt = 0;
  private sessionStart = 0;
  private restoring = false; // re-subscribing after a (re)connect, not yet done
  private restoreOverflows = 0; // sessions closed with 1013 while restoring, in a row
  private pending = new Map<number, Pending>();
  private subs = new Map<string, Subscription<any>>();
  private pulls = new Map<string, number>();
  private itemInboxes = new Map<string, Inbox<Item<any>>>();
  private itemHandlers = new Map<string, (item: Item<any>) => void>();
  private messageInbox: Inbox<Message<unknown>> | undefined;
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private connectId: number | undefined;
  private _connId: string | undefined;
  private _node: string | undefined;
  private _user: string | null = null;

  constructor(url: string, options: ClientOptions = {}) {
    super();
    if (!/^wss?:\/\//.test(url)) throw new TypeError(`url must be a ws:// or wss:// URL, got ${url}`);
    const backoffMin = options.backoffMin ?? 200;
    const backoffMax = options.backoffMax ?? 10_000;
    if (!(backoffMin > 0 && backoffMin <= backoffMax)) throw new RangeError("need 0 < backoffMin <= backoffMax");
    const requestTimeout = options.requestTimeout ?? 10_000;
    if (!(requestTimeout > 0)) throw new RangeError("requestTimeout must be > 0");
    const bufferSize = options.bufferSize ?? 1000;
    if (!(bufferSize >= 1)) throw new RangeError("bufferSize must be >= 1");
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (WS === undefined) {
      throw new TypeError("no WebSocket in this runtime: pass one, e.g. new Client(url, { WebSocket }) with the ws package");
    }
    this.url = url;
    this.WS = WS;
    this.options = { reconnect: options.reconnect ?? true, backoffMin, backoffMax, requestTimeout, bufferSize };
    this.token = options.token;
    this.getToken = options.getToken;
    this.refreshBefore = options.refreshBefore ?? 30;
    this.heartbeat = options.heartbeat ?? 0;
    if (!(this.heartbeat >= 0)) throw new RangeError("heartbeat must be >= 0 ms");
    this.logger = options.logger ?? quietLogger;
  }

  // -- state --

  get state(): ConnectionState {
    return this._state;
  }

  /** True while connected with every subscription restored. */
  get connected(): boolean {
    return this.ready && !this.stopped;
  }

  /** The server's id of the current (or last) connection; it changes on reconnect. */
  get connId(): string | undefined {
    return this._connId;
  }

  /** The server node holding the current (or last) connection. */
  get node(): string | undefined {
    return this._node;
  }

  /** The user the server knows this connection as (from the token), or null. */
  get user(): string | null {
    return this._user;
  }

  private setState(state: ConnectionState): void {
    if (this._state !== state) {
      this._state = state;
      this.emit("state", state);
    }
  }

  private checkUsable(): void {
    if (this.stopped) {
      if (this.error !== undefined) throw new ClientError(this.error.message);
      throw new ClientClosedError("the client is closed");
    }
    if (!this.started) throw new ClientError("not connected: call connect() first");
  }

  /** Wait until connected (e.g. after a drop); `ClientTimeoutError` past `timeout` ms. */
  waitConnected(timeout: number = this.options.requestTimeout): Promise<void> {
    try {
      this.checkUsable();
    } catch (err) {
      return Promise.reject(err);
    }
    if (this.ready) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      const wake = (): void => {
        clearTimeout(timer);
        this.readyWaiters.delete(wake);
        try {
          this.checkUsable();
          resolve();
        } catch (err) {
          reject(err);
        }
      };
      const timer = setTimeout(() => {
        this.readyWaiters.delete(wake);
        reject(new ClientTimeoutError(`not connected within ${timeout} ms`));
      }, timeout);
      this.readyWaiters.add(wake);
    });
  }

  private setReady(): void {
    this.ready = true;
    for (const wake of [...this.readyWaiters]) wake();
  }

  // -- lifecycle --

  /** Connect. The first attempt rejects if it fails; later drops are retried in the
   * background. Resolves once connected with every subscription restored. */
  async connect(): Promise<void> {
    if (this.stopped) throw new ClientClosedError("the client is closed");
    if (!this.started) {
      this.setState("connecting");
      let ws: WebSocketLike;
      try {
        ws = await this.open();
      } catch (err) {
        if (this.stopped) throw new ClientClosedError("the client was closed while connecting");
        this.setState("idle");
        throw err;
      }
      if (this.stopped) {
        ws.close(1000, "closed");
        throw new ClientClosedError("the client is closed");
      }
      this.started = true;
      this.attach(ws, false);
    }
    await this.waitConnected();
  }

  /** Close for good: iterators end after their buffer, pending requests reject with
   * `ClientClosedError`. Idempotent. */
  async close(): Promise<void> {
    const ws = this.ws;
    this.finish(undefined);
    if (ws !== undefined) await closeSocket(ws, 1000, "closed by the client", 2000);
  }


  private finish(error: ClientError | undefined): void {
    if (this.stopped) return;
    this.stopped = true;
    this.error = error;
    this.linkUp = false;
    this.ready = false;
    clearTimeout(this.retryTimer);
    clearTimeout(this.refreshTimer);
    clearInterval(this.heartbeatTimer);
    const ws = this.ws;
    this.ws = undefined;
    if (ws !== undefined) void closeSocket(ws, 1000, "closed by the client", 2000);
    const opening = this.opening;
    this.opening = undefined;
    if (opening !== undefined) opening.close(1000, "closed by the client"); // fails its open()
    const failure = error !== undefined ? new ClientError(error.message) : new ClientClosedError("the client was closed");
    this.failPending(failure);
    for (const sub of [...this.subs.values()]) sub._deactivate(error);
    this.messageInbox?.close(error);
    for (const inbox of this.itemInboxes.values()) {
      inbox.clear(); // leases die with the connection
      inbox.close(error);
    }
    for (const wake of [...this.readyWaiters]) wake();
    this.setState("closed");
    this.emit("closed", error === undefined ? {} : { error });
  }

  private failPending(err: ClientError): void {
    const pending = this.pending;
    this.pending = new Map();
    for (const entry of pending.values()) entry.reject(err);
  }

  private async currentToken(): Promise<string | undefined> {
    if (this.getToken !== undefined) {
      const exp = this.token === undefined ? undefined : tokenExpiry(this.token);
      const expired = exp !== undefined && exp * 1000 <= Date.now() + 1000;
      if (this.token === undefined || this.tokenStale || expired) {
        const token = await this.getToken();
        if (typeof token !== "string" || !token) throw new ClientError("getToken() returned no token");
        this.token = token;
        this.tokenStale = false;
      }
    }
    return this.token;
  }

  /** Open a socket, send the token (if any) and read the `welcome` frame. */
  private async open(): Promise<WebSocketLike> {
    const token = await this.currentToken();
    return new Promise<WebSocketLike>((resolve, reject) => {
      let settled = false;
      let ws: WebSocketLike;
      try {
        ws = new this.WS(this.url);
      } catch (err) {
        reject(new ClientError(`cannot connect to ${this.url}: ${String(err)}`));
        return;
      }
      this.opening = ws;
      const fail = (err: ClientError): void => {
        if (settled) return;
        settled = true;
        if (this.opening === ws) this.opening = undefined;
        clearTimeout(timer);
        detach(ws);
        if (ws.readyState <= OPEN) ws.close(1000, "no welcome");
        reject(err);
      };
      const timer = setTimeout(
        () => fail(new ClientTimeoutError(`no welcome from ${this.url} within ${this.options.requestTimeout} ms`)),
        this.options.requestTimeout,
      );
      ws.onopen = () => {
        if (token !== undefined) {
          this.connectId = ++this.nextId;
          ws.send(JSON.stringify({ type: "connect", id: this.connectId, token }));
        }
      };
      ws.onerror = () => {}; // a close event follows with the code
      ws.onclose = (ev) => {
        const reason = ev.reason || "";
        fail(new ConnectionClosedError(ev.code, reason, `cannot connect to ${this.url} (close code ${ev.code}${reason ? `, ${reason}` : ""})`));
      };
      ws.onmessage = (ev) => {
        let frame: unknown;
        try {
          frame = JSON.parse(frameText(ev.data));
        } catch {
          frame = undefined;
        }
        const f = frame as Record<string, unknown> | undefined;
        if (f === undefined || f === null || typeof f !== "object" || f.type !== "welcome") {
          fail(new ClientError(`expected a welcome frame, got ${frameText(ev.data).slice(0, 200)}`));
          return;
        }
        if (settled) return;
        settled = true;
        if (this.opening === ws) this.opening = undefined;
        clearTimeout(timer);
        this._connId = String(f.conn_id);
        this._node = String(f.node);
        this._user = typeof f.user === "string" ? f.user : null;
        // hand the socket over now, synchronously: the next frames may already be queued
        detach(ws);
        ws.onmessage = (e) => this.onRaw(ws, e.data);
        ws.onclose = (e) => this.onSocketClose(ws, e.code, e.reason || "");
        ws.onerror = () => {};
        resolve(ws);
      };
    });
  }

  /** Make `ws` the connection: restore subscriptions and pulls, then be ready. */
  private attach(ws: WebSocketLike, reconnect: boolean): void {
    this.ws = ws;
    this.generation++;
    this.sessionStart = Date.now();
    this.authFailures = 0;
    // snapshot and flag together: a subscription made from now on sends its own subscribe
    const subs = [...this.subs.values()];
    const pulls = [...this.pulls.entries()];
    this.linkUp = true;
    this.scheduleRefresh();
    if (this.heartbeat > 0) this.heartbeatTimer = setInterval(() => this.beat(ws), this.heartbeat);
    const replies: Promise<unknown>[] = [];
    // The server closes with 1013 when a reply is too large for its outbox: a recovery
    // that keeps failing like that would fail forever. Give it up (and report the gap).
    const giveUpRecovery = this.restoreOverflows >= 2;
    if (giveUpRecovery) this.logger.warn("recovery replies overflowed the server's outbox twice: re-subscribing without recover");
    this.restoring = true;
    for (const sub of subs) {
      if (sub.active) replies.push(this.sendSubscribe(sub, ws, giveUpRecovery).catch(() => undefined));
    }
    for (const [queue, max] of pulls) {
      replies.push(this.sendRequest(ws, { type: "pull", queue, max }).catch(() => undefined));
    }
    const restored = (): void => {
      if (this.ws !== ws || this.stopped) return;
      this.restoring = false;
      this.restoreOverflows = 0;
      this.setReady();
      this.setState("connected");
      this.emit("connected", { connId: this._connId ?? "", node: this._node ?? "", user: this._user, reconnect });
    };
    if (replies.length === 0) restored();
    else void withTimeout(Promise.all(replies), this.options.requestTimeout).then(restored, restored);
  }

  private onSocketClose(ws: WebSocketLike, code: number, reason: string): void {
    if (this.ws !== ws) return;
    if (this.restoring && code === TRY_AGAIN_LATER) this.restoreOverflows++;
    this.restoring = false;
    this.linkLost(ws);
    if (this.stopped) return;
    const what = `connection lost (close code ${code}${reason ? `, ${reason}` : ""})`;
    let final: string | undefined;
    if (!this.options.reconnect) final = what;
    else if (code === POLICY_VIOLATION) {
      const aboutToken = /token|authentication/i.test(reason);
      if (!aboutToken || this.getToken === undefined) final = `${what}; not reconnecting after a policy violation`;
      else this.tokenStale = true; // reconnect with a fresh token
    }
    this.emit("disconnected", { code, reason, willReconnect: final === undefined });
    if (final !== undefined) {
      this.finish(new ConnectionClosedError(code, reason, final));
      return;
    }
    this.logger.info(`${what}; reconnecting`);
    if (Date.now() - this.sessionStart >= this.options.backoffMax) this.attempt = 0; // not flapping
    this.setState("reconnecting");
    this.scheduleReconnect();
  }

  private linkLost(ws: WebSocketLike): void {
    if (this.ws === ws) this.ws = undefined;
    detach(ws);
    this.linkUp = false;
    this.ready = false;
    clearTimeout(this.refreshTimer);
    clearInterval(this.heartbeatTimer);
    this.failPending(new ClientError("connection lost before the reply"));
    for (const sub of this.subs.values()) sub._resyncInflight = false;
    for (const inbox of this.itemInboxes.values()) inbox.clear(); // the server redelivers them
  }

  private beat(ws: WebSocketLike): void {
    if (this.ws !== ws || !this.linkUp) return;
    const start = Date.now();
    this.call(ws, { type: "ping" }).then(
      () => this.emit("heartbeat", { rtt: Date.now() - start }),
      (err: unknown) => {
        if (err instanceof ClientTimeoutError && this.ws === ws) {
          this.logger.warn(`no pong within ${this.options.requestTimeout} ms: dropping the connection`);
          this.drop(ws, 4000, "no pong");
        }
      },
    );
  }

  /** Give up on `ws` now (without waiting for its close) and reconnect. */
  private drop(ws: WebSocketLike, code: number, reason: string): void {
    this.onSocketClose(ws, code, reason);
    void closeSocket(ws, code, reason, 2000);
  }

  private backoff(): number {
    const { backoffMin, backoffMax } = this.options;
    const cap = Math.min(backoffMax, backoffMin * 2 ** Math.min(this.attempt, 32));
    this.attempt++;
    return backoffMin + Math.random() * (cap - backoffMin);
  }

  private scheduleReconnect(): void {
    if (this.stopped) return;
    const delay = this.backoff();
    this.retryTimer = setTimeout(() => void this.reconnectNow(), delay);
    this.emit("reconnecting", { attempt: this.attempt, delay });
  }

  private async reconnectNow(): Promise<void> {
    if (this.stopped) return;
    let ws: WebSocketLike;
    try {
      ws = await this.open();
    } catch (err) {
      if (this.stopped) return;
      const error = err instanceof ClientError ? err : new ClientError(String(err));
      if (error instanceof ConnectionClosedError && error.code === POLICY_VIOLATION) {
        const aboutToken = /token|authentication/i.test(error.reason);
        if (!aboutToken || this.getToken === undefined || ++this.authFailures >= MAX_AUTH_FAILURES) {
          this.finish(new ConnectionClosedError(error.code, error.reason, `reconnect refused: ${error.message}`));
          return;
        }
        this.tokenStale = true;
      }
      this.logger.info(`reconnect attempt ${this.attempt} failed: ${error.message}`);
      this.emit("error", error);
      this.scheduleReconnect();
      return;
    }
    if (this.stopped) {
      ws.close(1000, "closed");
      return;
    }
    this.reconnects++;
    this.attach(ws, true);
  }

  // -- token refresh --

  private scheduleRefresh(): void {
    clearTimeout(this.refreshTimer);
    if (this.getToken === undefined || this.refreshBefore === false || this.token === undefined) return;
    const exp = tokenExpiry(this.token);
    if (exp === undefined) return;
    const remaining = exp * 1000 - Date.now();
    const margin = Math.min(this.refreshBefore * 1000, remaining / 2);
    const delay = Math.max(250, remaining - margin);
    this.refreshTimer = setTimeout(() => void this.refresh(), delay);
  }

  /** Get a fresh token from `getToken` and hand it to the server on the open
   * connection (same user); called on its own before a JWT expires. */
  async refresh(): Promise<void> {
    if (this.getToken === undefined) throw new ClientError("refresh() needs the getToken option");
    const ws = this.ws;
    if (ws === undefined || !this.linkUp) return; // the reconnection gets a fresh token
    try {
      const token = await this.getToken();
      if (typeof token !== "string" || !token) throw new ClientError("getToken() returned no token");
      const result = (await this.call(ws, { type: "refresh", token })) as Record<string, unknown> | null;
      this.token = token;
      this.tokenStale = false;
      const expires = result !== null && typeof result === "object" && typeof result.expires === "number" ? result.expires : null;
      this.emit("refreshed", { expires });
      if (this.ws === ws) this.scheduleRefresh();
    } catch (err) {
      const error = err instanceof ClientError ? err : new ClientError(String(err));
      this.logger.warn(`token refresh failed: ${error.message}`);
      this.tokenStale = true; // the expiry close makes the client reconnect with a new token
      this.emit("error", error);
    }
  }

  // -- reading --

  private onRaw(ws: WebSocketLike, data: unknown): void {
    if (this.ws !== ws) return;
    let frame: unknown;
    try {
      frame = JSON.parse(frameText(data));
    } catch {
      this.logger.warn("ignoring a frame that is not JSON");
      return;
    }
    if (frame === null || typeof frame !== "object" || Array.isArray(frame)) {
      this.logger.warn("ignoring a frame that is not an object");
      return;
    }
    try {
      this.dispatch(frame as Record<string, unknown>);
    } catch (err) {
      this.logger.warn(`ignoring a malformed ${String((frame as Record<string, unknown>).type)} frame`, err);
    }
  }

  private dispatch(frame: Record<string, unknown>): void {
    switch (frame.type) {
      case "publication": {
        const pub = toPublication(frame);
        for (const sub of [...this.subs.values()]) {
          if (patternMatches(sub.pattern, pub.channel)) sub._offer(pub);
        }
        break;
      }
      case "reply":
      case "error":
      case "pong":
        this.onAnswer(frame);
        break;
      case "message": {
        const message: Message<unknown> = { from: String(frame.from), data: frame.data };
        if (this.messageInbox?.putDroppingOldest(message)) this.logger.warn("message buffer full: dropped the oldest message");
        this.emit("message", message);
        break;
      }
      case "item": {
        const { queue, item } = frame;
        if (typeof queue !== "string" || typeof item !== "string") throw new TypeError("an item needs string queue and item");
        const attempt = typeof frame.attempt === "number" ? frame.attempt : 1;
        const it = new Item(this, queue, item, frame.data, attempt, this.generation);
        const handler = this.itemHandlers.get(queue);
        if (handler !== undefined) {
          try {
            handler(it);
          } catch (err) {
            this.logger.warn(`the item handler of ${queue} threw`, err);
          }
        } else this.itemInbox(queue).put(it); // unbounded: the server never sends past the pull credit
        break;
      }
      case "join":
      case "leave": {
        const channel = frame.channel;
        const member = (frame.member ?? {}) as Record<string, unknown>;
        if (typeof channel !== "string" || typeof member !== "object") throw new TypeError("join/leave needs channel and member");
        const event: MemberEvent = {
          kind: frame.type,
          channel,
          conn_id: String(member.conn_id),
          user: typeof member.user === "string" ? member.user : null,
        };
        for (const sub of [...this.subs.values()]) {
          if (sub.joinLeave && patternMatches(sub.pattern, channel)) sub._event(event);
        }
        break;
      }
      case "lagged": {
        const dropped = typeof frame.dropped === "number" ? frame.dropped : 0;
        this.lagged += dropped;
        this.logger.warn(`the server dropped ${dropped} publications for this slow client`);
        this.emit("lagged", { dropped });
        for (const sub of [...this.subs.values()]) {
          if (sub._recoverable) sub._beginRecovery("the server reported dropped publications");
        }
        break;
      }
      default:
        this.logger.debug(`ignoring a ${String(frame.type)} frame`);
    }
  }

  private onAnswer(frame: Record<string, unknown>): void {
    const id = frame.id;
    const entry = typeof id === "number" ? this.pending.get(id) : undefined;
    if (entry !== undefined) this.pending.delete(id as number);
    if (frame.type === "error") {
      const err = new ReplyError(String(frame.code), String(frame.message ?? ""));
      if (entry === undefined) {
        if (id !== this.connectId) this.logger.warn(`server error not tied to a request: ${err.message}`);
        return;
      }
      entry.onError?.(err);
      entry.reject(err);
      return;
    }
    if (entry === undefined) {
      if (id !== this.connectId) this.logger.debug(`a ${String(frame.type)} for no pending request (id ${String(id)})`);
      return;
    }
    try {
      entry.onResult?.(frame.result);
    } catch (err) {
      entry.reject(new ClientError(`malformed reply: ${String(err)}`));
      return;
    }
    entry.resolve(frame.result);
  }

  // -- writing --

  /** Write a request with a fresh id on `ws`; the promise of its answer (no timeout). */
  private sendRequest(
    ws: WebSocketLike,
    frame: Record<string, unknown>,
    onResult?: (result: any) => void,
    onError?: (err: ReplyError) => void,
  ): Promise<any> {
    const id = ++this.nextId;
    return new Promise((resolve, reject) => {
      if (ws.readyState !== OPEN) {
        reject(new ClientError("connection lost before the request was sent"));
        return;
      }
      this.pending.set(id, { resolve, reject, onResult, onError });
      try {
        ws.send(JSON.stringify({ ...frame, id }));
      } catch (err) {
        this.pending.delete(id);
        reject(new ClientError(`connection lost before the request was sent: ${String(err)}`));
      }
    });
  }

  private call(ws: WebSocketLike, frame: Record<string, unknown>, timeout = this.options.requestTimeout): Promise<any> {
    return withTimeout(
      this.sendRequest(ws, frame),
      timeout,
      () => new ClientTimeoutError(`${String(frame.type)}: no reply within ${this.options.requestTimeout} ms`),
    );
  }

  /** Wait for the connection (within the request timeout), send, await the reply. */
  private async request(frame: Record<string, unknown>): Promise<any> {
    this.checkUsable();
    const deadline = Date.now() + this.options.requestTimeout;
    if (!this.ready) await this.waitConnected();
    const ws = this.ws;
    if (ws === undefined) throw new ClientError("connection lost before the request was sent");
    return this.call(ws, frame, Math.max(1, deadline - Date.now()));
  }

  private sendSubscribe(sub: Subscription<any>, ws: WebSocketLike, giveUpRecovery = false): Promise<unknown> {
    const frame: Record<string, unknown> = { type: "subscribe", channel: sub.pattern };
    if (sub.joinLeave) frame.join_leave = true;
    const known = sub._recoverFrom();
    const pos = giveUpRecovery ? undefined : known;
    if (pos !== undefined) frame.recover = { offset: pos.offset, epoch: pos.epoch };
    sub._resyncInflight = true;
    return this.sendRequest(
      ws,
      frame,
      (result) => sub._onSubscribed(pos !== undefined, result, giveUpRecovery ? known : undefined),
      (err) => sub._onSubscribeError(err),
    );
  }

  /** @internal re-subscribe `sub` with `recover` now, if the link is up (else the reconnection does). */
  _resync(sub: Subscription<any>): void {
    const ws = this.ws;
    if (!this.linkUp || ws === undefined) return;
    void this.sendSubscribe(sub, ws).catch((err) => this.logger.debug(`re-subscribe of ${sub.pattern}: ${String(err)}`));
  }

  /** @internal */ _forget(sub: Subscription<any>): void {
    if (this.subs.get(sub.pattern) === sub) this.subs.delete(sub.pattern);
  }

  /** @internal */ async _unsubscribe(pattern: string): Promise<void> {
    const ws = this.ws;
    if (!this.linkUp || ws === undefined || this.stopped) return;
    try {
      await this.call(ws, { type: "unsubscribe", channel: pattern });
    } catch (err) {
      this.logger.debug(`unsubscribe ${pattern}: ${String(err)}`); // gone already, or the link dropped
    }
  }

  /** @internal */ async _settle(item: Item<any>, frame: Record<string, unknown>): Promise<void> {
    this.checkUsable();
    if (item._generation !== this.generation || !this.linkUp) {
      throw new ClientError(`item ${item.id} came on a connection that was lost; the server delivers it again`);
    }
    await this.request(frame);
  }

  // -- public API --

  /**
   * Subscribe to a channel or an MQTT-style pattern (`chat/+`, `orders/#`); resolves
   * once the server confirmed (rejects with `ReplyError`, e.g. `bad_pattern` or
   * `forbidden`, if it refused). One subscription per pattern and client. While the
   * client is reconnecting, the subscribe is sent when the connection is back.
   */
  async subscribe<T = Auto, P extends string = string>(
    pattern: P,
    options: SubscribeOptions<Resolve<NoInfer<T>, M, P>> = {},
  ): Promise<Subscription<Resolve<T, M, P>>> {
    if (typeof pattern !== "string" || !pattern) throw new TypeError("pattern must be a non-empty string");
    this.checkUsable();
    if (this.subs.has(pattern)) throw new ClientError(`this client is already subscribed to ${pattern}`);
    const sub = new Subscription<Resolve<T, M, P>>(this, pattern, options, this.options.bufferSize, this.logger);
    sub._active = true;
    this.subs.set(pattern, sub);
    const offs: (() => void)[] = [];
    const outcome = new Promise<void>((resolve, reject) => {
      offs.push(sub.on("subscribed", () => resolve()));
      offs.push(sub.on("end", ({ error }) => reject(error ?? new ClientClosedError("the client was closed"))));
      const ws = this.ws;
      if (this.linkUp && ws !== undefined) {
        // otherwise the next (re)connection subscribes everything in `subs`
        this.sendSubscribe(sub, ws).catch((err: unknown) => {
          if (err instanceof ReplyError) reject(err); // else the link dropped: the reconnection retries
        });
      }
    });
    try {
      await withTimeout(
        outcome,
        this.options.requestTimeout,
        () => new ClientTimeoutError(`subscribe ${pattern}: no reply within ${this.options.requestTimeout} ms`),
      );
    } catch (err) {
      sub._deactivate();
      throw err;
    } finally {
      for (const off of offs) off();
    }
    return sub;
  }

  /** Publish `data` (any JSON value) to a channel; resolves to its position. */
  async publish<T = Auto, C extends string = string>(channel: C, data: Resolve<NoInfer<T>, M, C>): Promise<StreamPos> {
    const result = (await this.request({ type: "publish", channel, data })) as Record<string, unknown>;
    return { offset: Number(result.offset), epoch: String(result.epoch) };
  }

  /** Send a direct message to one or many conn_ids; resolves to how many were reached
   * (rejects with `not_found` when none was). */
  async send(to: string | string[], data: unknown): Promise<number> {
    const targets = typeof to === "string" ? [to] : [...to];
    if (targets.length === 0 || !targets.every((t) => typeof t === "string" && t)) {
      throw new TypeError("to must be a conn_id or a non-empty list of them");
    }
    const result = (await this.request({ type: "send", to: typeof to === "string" ? to : targets, data })) as Record<string, unknown>;
    return Number(result.sent);
  }

  /** Direct messages to this client, in arrival order, from the first call on
   * (messages before it are only emitted as `"message"` events). One shared buffer. */
  messages<T = unknown>(): AsyncIterableIterator<Message<T>> {
    if (this.messageInbox === undefined) {
      this.messageInbox = new Inbox(this.options.bufferSize);
      if (this.stopped) this.messageInbox.close(this.error);
    }
    return this.messageInbox as unknown as AsyncIterableIterator<Message<T>>;
  }

  /** Connections subscribed to `channel` right now, on every node. */
  async presence(channel: string): Promise<Member[]> {
    const result = (await this.request({ type: "presence", channel })) as Record<string, unknown>;
    const members = (result.presence ?? {}) as Record<string, Record<string, unknown> | undefined>;
    return Object.entries(members).map(([connId, raw]) => {
      const member: Member = {
        conn_id: String(raw?.conn_id ?? connId),
        user: typeof raw?.user === "string" ? raw.user : null,
      };
      if (raw?.info !== undefined && raw.info !== null) member.info = raw.info;
      return member;
    });
  }

  /** `{num_clients, num_users}` of `channel`. */
  async presenceStats(channel: string): Promise<{ num_clients: number; num_users: number }> {
    const result = (await this.request({ type: "presence_stats", channel })) as Record<string, unknown>;
    return { num_clients: Number(result.num_clients), num_users: Number(result.num_users) };
  }

  /** Kept publications of `channel` (after `since`) and its current position. */
  async history<T = Auto, C extends string = string>(
    channel: C,
    options: { since?: StreamPos; limit?: number; reverse?: boolean } = {},
  ): Promise<HistoryPage<Resolve<T, M, C>>> {
    const frame: Record<string, unknown> = { type: "history", channel };
    if (options.since !== undefined) frame.since = { offset: options.since.offset, epoch: options.since.epoch };
    if (options.limit !== undefined) {
      if (!(options.limit >= 0)) throw new RangeError("limit must be >= 0");
      frame.limit = options.limit;
    }
    if (options.reverse) frame.reverse = true;
    const result = (await this.request(frame)) as Record<string, unknown>;
    const pubs = Array.isArray(result.publications) ? result.publications : [];
    return {
      publications: pubs.map((p) => toPublication<Resolve<T, M, C>>(p)),
      offset: Number(result.offset ?? 0),
      epoch: String(result.epoch ?? ""),
      recovered: result.recovered !== false,
    };
  }

  /** Round trip to the server, in milliseconds. */
  async ping(): Promise<number> {
    const start = Date.now();
    await this.request({ type: "ping" });
    return Date.now() - start;
  }

  /**
   * Become a consumer of `queue` with at most `max` items in flight. Items then come
   * to `onItem` if given, else to `items(queue)`; settle each with `ack()`/`nack()`.
   * The pull is re-issued after a reconnect (unacked items of the lost connection
   * are redelivered by the server).
   */
  async pull<T = unknown>(queue: string, options: { max?: number; onItem?: (item: Item<T>) => void } = {}): Promise<void> {
    if (typeof queue !== "string" || !queue) throw new TypeError("queue must be a non-empty string");
    const max = options.max ?? 1;
    if (!Number.isInteger(max) || max < 1) throw new RangeError("max must be an integer >= 1");
    if (options.onItem !== undefined) this.itemHandlers.set(queue, options.onItem as (item: Item<any>) => void);
    else this.itemInbox(queue);
    await this.request({ type: "pull", queue, max });
    this.pulls.set(queue, max);
  }

  /** Items of `queue` handed to this client (after `pull` without `onItem`). */
  items<T = unknown>(queue: string): AsyncIterableIterator<Item<T>> {
    return this.itemInbox(queue) as unknown as AsyncIterableIterator<Item<T>>;
  }

  private itemInbox(queue: string): Inbox<Item<any>> {
    let inbox = this.itemInboxes.get(queue);
    if (inbox === undefined) {
      inbox = new Inbox(undefined);
      this.itemInboxes.set(queue, inbox);
      if (this.stopped) inbox.close(this.error);
    }
    return inbox;
  }
}

// --- helpers --------------------------------------------------------------------------

function ignore(): void {}

/** Drop our handlers (an error listener stays: the ws package throws on an unheard error). */
function detach(ws: WebSocketLike): void {
  ws.onopen = null;
  ws.onmessage = null;
  ws.onclose = null;
  ws.onerror = ignore;
}

function withTimeout<T>(promise: Promise<T>, ms: number, error?: () => ClientError): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(error ? error() : new ClientTimeoutError(`no answer within ${ms} ms`)), ms);
    promise.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (err: unknown) => {
        clearTimeout(timer);
        reject(err);
      },
    );
  });
}

/** Close `ws` and wait (bounded) for the closing handshake. */
const closing = new WeakMap<WebSocketLike, Promise<void>>();

function closeSocket(ws: WebSocketLike, code: number, reason: string, ms: number): Promise<void> {
  const already = closing.get(ws);
  if (already !== undefined) return already;
  const done = new Promise<void>((resolve) => {
    if (ws.readyState === CLOSED) {
      resolve();
      return;
    }
    detach(ws);
    const timer = setTimeout(resolve, ms);
    ws.onclose = () => {
      clearTimeout(timer);
      resolve();
    };
    ws.onerror = () => {};
    try {
      if (ws.readyState <= OPEN) ws.close(code, reason);
    } catch {
      clearTimeout(timer);
      resolve();
    }
  });
  closing.set(ws, done);
  return done;
}
