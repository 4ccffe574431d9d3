// Reconnect and recovery after the server is killed and started again on the same port.
// memory://: history dies with the process, so the client must report recovered=false.
// redis://: history survives, so the client recovers the publications it missed.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { connect as tcpConnect } from "node:net";
import { after, test } from "node:test";
import { WebSocket } from "ws";
import { Client } from "../dist/tidings.js";
import { Server, nextEvent, take } from "./server.mjs";

const RESTART_TIMEOUT = 30_000;
const servers = [];
const clients = [];

after(async () => {
  for (const c of clients) await c.close();
  for (const s of servers) await s.stop();
});

function newClient(url) {
  const c = new Client(url, { WebSocket, backoffMin: 50, backoffMax: 400, requestTimeout: RESTART_TIMEOUT });
  clients.push(c);
  return c;
}

function reachable(port) {
  return new Promise((resolve) => {
    const sock = tcpConnect({ host: "127.0.0.1", port }, () => {
      sock.end();
      resolve(true);
    });
    sock.on("error", () => resolve(false));
    sock.setTimeout(2000, () => {
      sock.destroy();
      resolve(false);
    });
  });
}

test("memory broker: after a restart the client reconnects, re-subscribes and reports recovered=false", async () => {
  const server = new Server();
  servers.push(server);
  await server.start();
  const c = newClient(server.wsUrl);
  await c.connect();
  const firstConn = c.connId;
  const exact = await c.subscribe("news/x");
  const pattern = await c.subscribe("news/+");
  await c.publish("news/x", 1);
  await c.publish("news/x", 2);
  assert.deepEqual((await take(exact, 2)).map((p) => p.data), [1, 2]);
  assert.equal((await take(pattern, 2)).length, 2);
  const before = exact.position;

  const dropped = nextEvent(c, "disconnected", () => true, RESTART_TIMEOUT);
  const resubscribed = nextEvent(exact, "subscribed", (i) => i.resubscribed, RESTART_TIMEOUT);
  const patternBack = nextEvent(pattern, "subscribed", (i) => i.resubscribed, RESTART_TIMEOUT);
  await server.stop();
  const gone = await dropped;
  assert.equal(gone.willReconnect, true);
  assert.notEqual(c.state, "connected");
  // a request made during the outage waits for the connection and then succeeds
  const duringOutage = c.ping();

  await server.start(); // same port, a fresh memory broker: the history is gone
  const info = await resubscribed;
  assert.equal(info.recoverAsked, true);
  assert.equal(info.recovered, false);
  assert.equal(info.replayed, 0);
  assert.notEqual(info.epoch, before.epoch);
  assert.equal(exact.recovered, false);
  assert.ok(exact.gaps >= 1);
  const patternInfo = await patternBack;
  assert.equal(patternInfo.recoverAsked, false); // the server does not recover patterns
  assert.ok((await duringOutage) >= 0);
  await c.waitConnected();
  assert.equal(c.reconnects, 1);
  assert.notEqual(c.connId, firstConn);

  // the subscriptions are live again, in the new epoch
  const { status } = await server.api("publish", { channel: "news/x", data: "after" });
  assert.equal(status, 200);
  const [pub] = await take(exact, 1);
  assert.deepEqual([pub.data, pub.offset, pub.epoch], ["after", 1, info.epoch]);
  assert.equal((await take(pattern, 1))[0].data, "after");
});

test("redis broker: the publications missed while the server was down are recovered", async (t) => {
  if (!(await reachable(6379))) {
    if (process.env.CI === "true") assert.fail("Redis is not running on 127.0.0.1:6379 (required under CI=true)");
    t.skip("Redis is not running on 127.0.0.1:6379");
    return;
  }
  const prefix = `tidings-js-${randomBytes(6).toString("hex")}`;
  const broker = `redis://127.0.0.1:6379/0?prefix=${prefix}`;
  t.after(() => {
    try {
      const keys = execFileSync("redis-cli", ["--scan", "--pattern", `${prefix}:*`], { encoding: "utf8" }).split("\n").filter(Boolean);
      if (keys.length) execFileSync("redis-cli", ["del", ...keys]);
    } catch {
      // best effort: redis-cli may be missing; the keys then expire with the history TTL
    }
  });
  const a = new Server({ args: ["--broker", broker] });
  const b = new Server({ args: ["--broker", broker] }); // a second node on the same Redis
  servers.push(a, b);
  await Promise.all([a.start(), b.start()]);
  const c = newClient(a.wsUrl);
  await c.connect();
  const sub = await c.subscribe("orders/7");
  await c.publish("orders/7", { n: 1 });
  await c.publish("orders/7", { n: 2 });
  assert.deepEqual((await take(sub, 2)).map((p) => p.offset), [1, 2]);
  const { epoch } = sub.position;

  const dropped = nextEvent(c, "disconnected", () => true, RESTART_TIMEOUT);
  const resubscribed = nextEvent(sub, "subscribed", (i) => i.resubscribed, RESTART_TIMEOUT);
  await a.stop("SIGKILL"); // no goodbye
  await dropped;
  // published through the other node while the client has no connection
  for (const n of [3, 4, 5]) {
    const { status, body } = await b.api("publish", { channel: "orders/7", data: { n } });
    assert.equal(status, 200);
    assert.equal(body.result.offset, n);
  }
  await a.start();
  const info = await resubscribed;
  assert.equal(info.recoverAsked, true);
  assert.equal(info.recovered, true);
  assert.equal(info.replayed, 3);
  assert.equal(info.epoch, epoch);
  assert.equal(sub.recovered, true);
  assert.equal(sub.gaps, 0);
  const missed = await take(sub, 3);
  assert.deepEqual(missed.map((p) => [p.offset, p.data.n, p.epoch]), [[3, 3, epoch], [4, 4, epoch], [5, 5, epoch]]);
  // and live again, across nodes
  await b.api("publish", { channel: "orders/7", data: { n: 6 } });
  const [live] = await take(sub, 1);
  assert.deepEqual([live.offset, live.data.n], [6, 6]);
});

test("heartbeat: a server that stops answering (SIGSTOP) is dropped with 4000 and reconnected after SIGCONT", async () => {
  const server = new Server();
  servers.push(server);
  await server.start();
  const c = new Client(server.wsUrl, { WebSocket, heartbeat: 200, requestTimeout: 600, backoffMin: 50, backoffMax: 300 });
  clients.push(c);
  await c.connect();
  const sub = await c.subscribe("hb/x");
  await c.publish("hb/x", 1);
  await take(sub, 1);
  const firstConn = c.connId;
  const dropped = nextEvent(c, "disconnected", () => true, RESTART_TIMEOUT);
  const back = nextEvent(c, "connected", (e) => e.reconnect, RESTART_TIMEOUT);
  const resubscribed = nextEvent(sub, "subscribed", (i) => i.resubscribed, RESTART_TIMEOUT);
  server.proc.kill("SIGSTOP"); // the TCP connection stays open: only the heartbeat can tell
  let drop;
  try {
    drop = await dropped;
    assert.deepEqual([drop.code, drop.reason, drop.willReconnect], [4000, "no pong", true]);
  } finally {
    server.proc.kill("SIGCONT");
  }
  const info = await back;
  assert.notEqual(info.connId, firstConn);
  const sub2 = await resubscribed;
  assert.equal(sub2.recovered, true); // same process: the history is there
  await c.publish("hb/x", 2);
  assert.deepEqual((await take(sub, 1)).map((p) => p.offset), [2]);
});
