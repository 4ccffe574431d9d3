// A slow consumer: the test stops reading the client's socket (TCP backpressure) while
// publications pile up on the server. With `--overflow drop` the server drops them and
// says `lagged`; by default it closes with 1013. Either way the client recovers every
// publication from history, in order, each once.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { WebSocket } from "ws";
import { Client } from "../dist/tidings.js";
import { Server, nextEvent, take, until } from "./server.mjs";

const MAX = 600; // publications at most (history keeps 1000)
const PAYLOAD = "x".repeat(50_000); // under the 64 KiB frame limit
const servers = [];
const clients = [];

after(async () => {
  for (const c of clients) await c.close();
  for (const s of servers) await s.stop();
});

/** A WebSocket class that remembers its sockets, so a test can pause one (ws's pause()). */
function recording() {
  const sockets = [];
  class Recording extends WebSocket {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
  }
  return { Recording, sockets };
}

async function overflows(server) {
  const text = await (await fetch(`${server.base}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith("tidings_overflows_total "));
  return line === undefined ? 0 : Number(line.split(" ")[1]);
}

/** Publish until the server's outbox for the paused client overflows (kernel buffers
 * first, then the outbox), then stop: the replay the client needs stays small (the
 * server refuses to queue a reply above twice its outbox bytes, so a recovery of
 * tens of MiB could never be delivered; see the report). Returns how many. */
async function flood(server, channel) {
  for (let n = 1; n <= MAX; n++) {
    const { status } = await server.api("publish", { channel, data: { n, pad: PAYLOAD } });
    assert.equal(status, 200);
    if (n % 5 === 0 && (await overflows(server)) > 0) return n;
  }
  assert.fail(`no overflow after ${MAX} publications of ${PAYLOAD.length} bytes`);
}

async function allInOrder(sub, count) {
  const pubs = await take(sub, count, 60_000);
  assert.deepEqual(pubs.map((p) => p.offset), Array.from({ length: count }, (_, i) => i + 1));
  assert.deepEqual(pubs.map((p) => p.data.n), Array.from({ length: count }, (_, i) => i + 1));
}

for (const [policy, expect] of [["drop", "lagged"], ["disconnect", "1013"]]) {
  test(`--overflow ${policy}: the client is told (${expect}) and recovers everything from history`, async () => {
    const server = new Server({ args: ["--overflow", policy] });
    servers.push(server);
    await server.start();
    const { Recording, sockets } = recording();
    const c = new Client(server.wsUrl, { WebSocket: Recording, backoffMin: 50, backoffMax: 300, bufferSize: 10_000 });
    clients.push(c);
    await c.connect();
    const sub = await c.subscribe("slow/x");
    const told = policy === "drop"
      ? nextEvent(c, "lagged", () => true, 60_000)
      : nextEvent(c, "disconnected", (d) => d.code === 1013, 60_000);
    sockets.at(-1).pause(); // stop reading: the kernel buffers fill, then the server's outbox
    const count = await flood(server, "slow/x");
    sockets.at(-1).resume();
    const event = await told;
    if (policy === "drop") {
      assert.ok(event.dropped > 0);
      assert.ok(c.lagged >= event.dropped);
    } else {
      assert.equal(event.willReconnect, true);
    }
    await allInOrder(sub, count);
    assert.ok(sub.recoveries >= 1 || sub.lastSubscribed.replayed > 0);
    assert.equal(sub.gaps, 0);
    assert.equal(sub.dropped, 0);
  });
}

test("a recovery too large for one reply is answered recovered: false and reported as a gap", async () => {
  const server = new Server();
  servers.push(server);
  await server.start();
  const { Recording, sockets } = recording();
  const c = new Client(server.wsUrl, { WebSocket: Recording, backoffMin: 50, backoffMax: 300, bufferSize: 10_000 });
  clients.push(c);
  await c.connect();
  const got = [];
  const sub = await c.subscribe("huge/x", { onPublication: (p) => got.push(p) });
  const gap = nextEvent(sub, "gap", () => true, 60_000);
  sockets.at(-1).pause();
  const count = 300; // ~15 MB: far more than a reply may carry (2 x 1 MiB)
  for (let n = 1; n <= count; n++) await server.api("publish", { channel: "huge/x", data: { n, pad: PAYLOAD } });
  sockets.at(-1).resume();
  const info = await gap;
  assert.equal(info.to, count);
  assert.ok(c.reconnects >= 1); // the flood overflowed the outbox: 1013, then a recovery
  await c.waitConnected(30_000);
  // the server refused a replay of ~15 MB (more than one reply may carry) rather
  // than queue a frame it could never send: recovered false, a gap, live again
  assert.equal(sub.lastSubscribed.recoverAsked, true);
  assert.equal(sub.lastSubscribed.recovered, false);
  assert.ok(sub.gaps >= 1);
  // live publications flow again after the gap; everything came in order, each once
  const { body } = await server.api("publish", { channel: "huge/x", data: { n: "after" } });
  assert.equal(body.result.offset, count + 1);
  await until(() => got.at(-1)?.data.n === "after", "the publication after the gap");
  const offsets = got.map((p) => p.offset);
  assert.ok(offsets.every((o, i) => i === 0 || o > offsets[i - 1]), `not increasing: ${offsets}`);
  assert.equal(offsets.at(-1), count + 1);
});
