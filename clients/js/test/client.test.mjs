// The client against a real `tidings serve` (memory broker): pub/sub, wildcards,
// history, presence, join/leave, direct messages, queues, errors, close.
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { after, before, describe, test } from "node:test";
import { WebSocket } from "ws";
import {
  Client,
  ClientClosedError,
  ClientError,
  ReplyError,
  patternMatches,
  tokenExpiry,
} from "../dist/tidings.js";
import { Server, TIMEOUT, nextEvent, take, until } from "./server.mjs";

const server = new Server();
const clients = [];

async function client(options = {}) {
  const c = new Client(server.wsUrl, { WebSocket, ...options });
  clients.push(c);
  await c.connect();
  return c;
}

/** Push `items` to a queue through the raw `/ws/push/{queue}` stream (acked per frame). */
async function push(queue, items) {
  const ws = new WebSocket(`ws://127.0.0.1:${server.port}/ws/push/${queue}`);
  await new Promise((resolve, reject) => {
    ws.once("open", resolve);
    ws.once("error", reject);
  });
  for (const item of items) ws.send(JSON.stringify(item));
  // the push endpoint takes every frame it read before the close
  await new Promise((resolve) => {
    ws.once("close", resolve);
    ws.close(1000);
  });
}

before(async () => {
  await server.start();
});

after(async () => {
  for (const c of clients) await c.close();
  await server.stop();
});

describe("patterns and tokens (no server)", () => {
  test("patternMatches follows MQTT", () => {
    assert.ok(patternMatches("a/+/c", "a/b/c"));
    assert.ok(!patternMatches("a/+/c", "a/b/d"));
    assert.ok(!patternMatches("a/+", "a/b/c"));
    assert.ok(patternMatches("a/#", "a/b/c"));
    assert.ok(patternMatches("a/#", "a"));
    assert.ok(patternMatches("#", "x/y"));
    assert.ok(!patternMatches("#", "$sys/x"));
    assert.ok(!patternMatches("+/x", "$sys/x"));
    assert.ok(patternMatches("$sys/#", "$sys/x"));
    assert.ok(!patternMatches("a/b", "a/c"));
  });

  test("tokenExpiry reads a JWT's exp without verifying", () => {
    const part = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
    assert.equal(tokenExpiry(`${part({ alg: "HS256" })}.${part({ sub: "u", exp: 1234 })}.sig`), 1234);
    assert.equal(tokenExpiry("opaque-token"), undefined);
    assert.equal(tokenExpiry(`${part({})}.${part({ sub: "u" })}.x`), undefined);
  });

  test("a URL that is not ws:// is refused", () => {
    assert.throws(() => new Client("http://x/ws", { WebSocket }), TypeError);
  });
});

describe("against tidings serve", () => {
  test("connect gives a conn_id and node; ping answers", async () => {
    const c = await client();
    assert.equal(c.state, "connected");
    assert.ok(c.connected);
    assert.match(c.connId, /\S+/);
    assert.ok(c.node && c.connId.startsWith(c.node));
    const rtt = await c.ping();
    assert.ok(rtt >= 0 && rtt < TIMEOUT);
  });

  test("publish and subscribe: an exact channel, offsets in order, sender set", async () => {
    const a = await client();
    const b = await client();
    const sub = await b.subscribe("chat/room1");
    assert.equal(sub.lastSubscribed.recoverAsked, false);
    const positions = [];
    for (let i = 0; i < 5; i++) positions.push(await a.publish("chat/room1", { text: `hi ${i}` }));
    assert.deepEqual(positions.map((p) => p.offset), [1, 2, 3, 4, 5]);
    const pubs = await take(sub, 5);
    assert.deepEqual(pubs.map((p) => p.data.text), ["hi 0", "hi 1", "hi 2", "hi 3", "hi 4"]);
    assert.deepEqual(pubs.map((p) => p.offset), [1, 2, 3, 4, 5]);
    assert.ok(pubs.every((p) => p.sender === a.connId && p.epoch === positions[0].epoch && p.ts > 0));
    assert.deepEqual(sub.position, { offset: 5, epoch: positions[0].epoch });
  });

  test("wildcards: + matches one level, # the rest; each subscription gets its own copy", async () => {
    const c = await client();
    const plus = await c.subscribe("orders/+/status");
    const hash = await c.subscribe("orders/#");
    await c.publish("orders/1/status", "paid");
    await c.publish("orders/1/items/3", "added"); // not for orders/+/status
    await c.publish("orders/2/status", "sent");
    await c.publish("other/1/status", "nope");
    const fromPlus = await take(plus, 2);
    const fromHash = await take(hash, 3);
    assert.deepEqual(fromPlus.map((p) => [p.channel, p.data]), [["orders/1/status", "paid"], ["orders/2/status", "sent"]]);
    assert.deepEqual(fromHash.map((p) => p.channel), ["orders/1/status", "orders/1/items/3", "orders/2/status"]);
    // nothing else arrived: a marker published last is the next item of both
    await c.publish("orders/9/status", "marker");
    assert.equal((await take(plus, 1))[0].data, "marker");
    assert.equal((await take(hash, 1))[0].data, "marker");
  });

  test("callback style: onPublication gets every publication, iteration is refused", async () => {
    const c = await client();
    const got = [];
    const sub = await c.subscribe("cb/+", { onPublication: (p) => got.push(p.data) });
    await c.publish("cb/a", 1);
    await c.publish("cb/b", 2);
    await until(() => got.length === 2, "two callbacks");
    assert.deepEqual(got, [1, 2]);
    assert.throws(() => sub[Symbol.asyncIterator](), ClientError);
  });

  test("unsubscribe stops delivery and ends the iteration", async () => {
    const c = await client();
    const sub = await c.subscribe("unsub/x");
    await c.publish("unsub/x", 1);
    assert.equal((await take(sub, 1))[0].data, 1);
    await sub.unsubscribe();
    assert.equal(sub.active, false);
    await c.publish("unsub/x", 2);
    assert.deepEqual(await take(sub, 1), []); // ended, nothing more
    // subscribing again works (one subscription per pattern at a time)
    const again = await c.subscribe("unsub/x");
    await c.publish("unsub/x", 3);
    assert.equal((await take(again, 1))[0].data, 3);
  });

  test("server errors: bad_pattern and bad_channel are ReplyErrors, the connection stays", async () => {
    const c = await client();
    await assert.rejects(c.subscribe("a/#/b"), (err) => err instanceof ReplyError && err.code === "bad_pattern");
    await assert.rejects(c.publish("a/+", 1), (err) => err instanceof ReplyError && err.code === "bad_channel");
    await assert.rejects(c.publish("$sys/x", 1), (err) => err instanceof ReplyError);
    await assert.rejects(c.subscribe("dup/x").then(() => c.subscribe("dup/x")), ClientError);
    assert.equal(c.state, "connected");
    assert.ok((await c.ping()) >= 0);
  });

  test("history: since, limit, reverse, and the channel's position", async () => {
    const c = await client();
    for (let i = 1; i <= 6; i++) await c.publish("hist/x", { n: i });
    const all = await c.history("hist/x");
    assert.deepEqual(all.publications.map((p) => p.data.n), [1, 2, 3, 4, 5, 6]);
    assert.equal(all.offset, 6);
    assert.ok(all.epoch);
    const since = await c.history("hist/x", { since: { offset: 4, epoch: all.epoch } });
    assert.deepEqual(since.publications.map((p) => p.offset), [5, 6]);
    assert.equal(since.recovered, true);
    const limited = await c.history("hist/x", { limit: 2 });
    assert.equal(limited.publications.length, 2);
    const reversed = await c.history("hist/x", { reverse: true, limit: 2 });
    assert.deepEqual(reversed.publications.map((p) => p.offset), [6, 5]);
    const wrongEpoch = await c.history("hist/x", { since: { offset: 1, epoch: "not-the-epoch" } });
    assert.equal(wrongEpoch.recovered, false);
  });

  test("presence, presenceStats and join/leave events", async () => {
    const watcher = await client();
    const joins = [];
    const leaves = [];
    await watcher.subscribe("room/+", {
      joinLeave: true,
      onPublication: () => {},
      onJoin: (e) => joins.push(e),
      onLeave: (e) => leaves.push(e),
    });
    const member = await client();
    const sub = await member.subscribe("room/42");
    const join = await until(() => joins.find((e) => e.conn_id === member.connId), "a join event");
    assert.deepEqual(join, { kind: "join", channel: "room/42", conn_id: member.connId, user: null });
    const present = await watcher.presence("room/42");
    assert.deepEqual(present.map((m) => m.conn_id), [member.connId]);
    assert.deepEqual(await watcher.presenceStats("room/42"), { num_clients: 1, num_users: 0 });
    await sub.unsubscribe();
    const leave = await until(() => leaves.find((e) => e.conn_id === member.connId), "a leave event");
    assert.equal(leave.kind, "leave");
    assert.equal(leave.channel, "room/42");
    assert.deepEqual(await watcher.presence("room/42"), []);
  });

  test("direct messages: send to one and to many; messages() and the message event", async () => {
    const a = await client();
    const b = await client();
    const c = await client();
    const inboxB = b.messages();
    const seenByC = nextEvent(c, "message");
    assert.equal(await a.send(b.connId, { hello: "b" }), 1);
    assert.equal(await a.send([b.connId, c.connId], "both"), 2);
    const [first, second] = await take(inboxB, 2);
    assert.deepEqual(first, { from: a.connId, data: { hello: "b" } });
    assert.deepEqual(second, { from: a.connId, data: "both" });
    assert.deepEqual(await seenByC, { from: a.connId, data: "both" });
    await assert.rejects(a.send(`${a.node}.no-such-conn`, 1), (err) => err instanceof ReplyError && err.code === "not_found");
  });

  test("queues: pull, ack; a nacked item comes back with attempt 2; each item to one consumer", async () => {
    const worker = await client();
    await worker.pull("jobs", { max: 1 });
    await push("jobs", [{ job: 1 }]);
    const items = worker.items("jobs");
    const [one] = await take(items, 1);
    assert.deepEqual([one.queue, one.data, one.attempt], ["jobs", { job: 1 }, 1]);
    await one.nack(0);
    const [again] = await take(items, 1);
    assert.equal(again.id, one.id);
    assert.equal(again.attempt, 2);
    await again.ack();
    await push("jobs", [{ job: 2 }]);
    const [two] = await take(items, 1);
    assert.deepEqual(two.data, { job: 2 });
    await two.ack();
    await assert.rejects(two.ack(), (err) => err instanceof ReplyError && err.code === "not_found");

    // two consumers with a callback each: every item goes to exactly one of them
    const c1 = await client();
    const c2 = await client();
    const got = new Map();
    for (const [name, c] of [["c1", c1], ["c2", c2]]) {
      await c.pull("work", {
        max: 4,
        onItem: (item) => {
          got.set(item.data.n, name);
          void item.ack();
        },
      });
    }
    await push("work", Array.from({ length: 20 }, (_, n) => ({ n })));
    await until(() => got.size === 20, "20 items consumed");
    assert.deepEqual([...got.keys()].sort((x, y) => x - y), Array.from({ length: 20 }, (_, n) => n));
  });

  test("a full buffer on an exact channel is repaired from history: all 20 in order, none dropped", async () => {
    const publisher = await client();
    const slow = await client({ bufferSize: 4 });
    const sub = await slow.subscribe("buf/x");
    for (let i = 1; i <= 20; i++) await publisher.publish("buf/x", i);
    await until(() => sub.recoveries >= 1, "the subscription to notice its full buffer");
    const pubs = await take(sub, 20);
    assert.deepEqual(pubs.map((p) => p.offset), Array.from({ length: 20 }, (_, i) => i + 1));
    assert.deepEqual(pubs.map((p) => p.data), Array.from({ length: 20 }, (_, i) => i + 1));
    assert.equal(sub.dropped, 0);
    assert.equal(sub.gaps, 0);
    // a pattern subscription cannot be recovered: it drops the oldest and counts them
    const patternSub = await slow.subscribe("buf/+");
    for (let i = 21; i <= 30; i++) await publisher.publish("buf/x", i);
    await until(() => patternSub.dropped === 6, "6 dropped from a buffer of 4");
    assert.deepEqual((await take(patternSub, 4)).map((p) => p.data), [27, 28, 29, 30]);
  });

  test("heartbeat: pings while connected and reports the round trip", async () => {
    const c = await client({ heartbeat: 50 });
    const beat = await nextEvent(c, "heartbeat");
    assert.ok(beat.rtt >= 0 && beat.rtt < TIMEOUT);
  });

  test("close(): idempotent, iterators end, requests reject with ClientClosedError", async () => {
    const c = await client();
    const sub = await c.subscribe("closing/x");
    await c.publish("closing/x", "kept");
    await until(() => sub.position?.offset === 1, "the publication to arrive");
    const states = [];
    c.on("state", (s) => states.push(s));
    await c.close();
    await c.close();
    assert.equal(c.state, "closed");
    assert.deepEqual(states, ["closed"]);
    assert.deepEqual((await take(sub, 5)).map((p) => p.data), ["kept"]); // buffered, then the end
    await assert.rejects(c.publish("closing/x", 1), ClientClosedError);
    await assert.rejects(c.subscribe("closing/y"), ClientClosedError);
    await assert.rejects(c.connect(), ClientClosedError);
  });

  test("close() during a connect that gets no answer ends it at once", async () => {
    const sockets = [];
    const silent = createServer((socket) => sockets.push(socket)); // accepts TCP, never answers
    await new Promise((resolve) => silent.listen(0, "127.0.0.1", resolve));
    try {
      const c = new Client(`ws://127.0.0.1:${silent.address().port}/ws`, { WebSocket });
      const connecting = c.connect();
      await new Promise((resolve) => setTimeout(resolve, 100));
      const started = Date.now();
      await c.close();
      await assert.rejects(connecting, ClientClosedError);
      assert.ok(Date.now() - started < 3000);
      assert.equal(c.state, "closed");
    } finally {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => silent.close(resolve));
    }
  });

  test("connect to a port with no server rejects", async () => {
    const c = new Client("ws://127.0.0.1:9/ws", { WebSocket, requestTimeout: 3000 });
    await assert.rejects(c.connect(), ClientError);
    await c.close();
  });
});
