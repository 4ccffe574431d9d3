// JWT auth (`tidings serve --jwt-secret`): the token in the first frame, refresh on the
// open connection before expiry, and reconnecting with a fresh token after an expiry close.
import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import { after, before, test } from "node:test";
import { WebSocket } from "ws";
import { Client, ConnectionClosedError } from "../dist/tidings.js";
import { Server, nextEvent, take } from "./server.mjs";

const SECRET = randomBytes(24).toString("hex");
const server = new Server({ args: ["--jwt-secret", SECRET, "--jwt-leeway", "0"] });
const clients = [];

function mint(sub, lifetime, secret = SECRET) {
  const part = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const head = `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub, exp: Math.floor(Date.now() / 1000) + lifetime, channels: ["auth/#"] })}`;
  return `${head}.${createHmac("sha256", secret).update(head).digest("base64url")}`;
}

function client(options) {
  const c = new Client(server.wsUrl, { WebSocket, backoffMin: 50, backoffMax: 500, ...options });
  clients.push(c);
  return c;
}

before(async () => {
  await server.start();
});

after(async () => {
  for (const c of clients) await c.close();
  await server.stop();
});

test("a token is sent in the first frame; the server knows the user", async () => {
  const c = client({ token: mint("alice", 60) });
  await c.connect();
  assert.equal(c.user, "alice");
  const sub = await c.subscribe("auth/x");
  await c.publish("auth/x", "hi");
  assert.equal((await take(sub, 1))[0].data, "hi");
  const present = await c.presence("auth/x");
  assert.deepEqual(present.map((m) => m.user), ["alice"]);
  // the token's channels claim is enforced: elsewhere is forbidden, the connection stays
  await assert.rejects(c.publish("other/x", 1), (err) => err.code === "forbidden");
  assert.equal(c.state, "connected");
});

test("a bad token without getToken: connect rejects with the 1008 close", async () => {
  const c = client({ token: mint("mallory", 60, "not-the-secret") });
  await assert.rejects(c.connect(), (err) => err instanceof ConnectionClosedError && err.code === 1008 && /authentication failed/.test(err.reason));
  const anonymous = client({});
  await assert.rejects(anonymous.connect(), (err) => err instanceof ConnectionClosedError && err.code === 1008);
});

test("getToken: the token is refreshed on the open connection before it expires", async () => {
  let calls = 0;
  const c = client({
    getToken: () => {
      calls++;
      return mint("bob", 3);
    },
  });
  const drops = [];
  c.on("disconnected", (d) => drops.push(d));
  await c.connect();
  const conn = c.connId;
  assert.equal(c.user, "bob");
  assert.equal(calls, 1);
  // each token lives 3 s and is refreshed halfway: two refreshes take us past the first exp
  const first = await nextEvent(c, "refreshed", () => true, 10_000);
  assert.ok(first.expires > Date.now() / 1000);
  await nextEvent(c, "refreshed", () => true, 10_000);
  assert.ok(calls >= 3);
  assert.equal(c.connId, conn); // the same connection all along
  assert.deepEqual(drops, []);
  assert.ok((await c.ping()) >= 0);
});

test("getToken without refresh: the expiry close (1008 token expired) reconnects with a fresh token", async () => {
  let calls = 0;
  const c = client({
    refreshBefore: false,
    getToken: () => {
      calls++;
      return mint("carol", 2);
    },
  });
  await c.connect();
  const conn = c.connId;
  const sub = await c.subscribe("auth/carol");
  await c.publish("auth/carol", 1);
  await take(sub, 1);
  const dropped = nextEvent(c, "disconnected", () => true, 10_000);
  const back = nextEvent(c, "connected", (e) => e.reconnect, 15_000);
  const resubscribed = nextEvent(sub, "subscribed", (i) => i.resubscribed, 15_000);
  const drop = await dropped;
  assert.equal(drop.code, 1008);
  assert.match(drop.reason, /token expired/);
  assert.equal(drop.willReconnect, true);
  const info = await back;
  assert.equal(info.user, "carol");
  assert.notEqual(info.connId, conn);
  assert.equal(calls, 2);
  const sub2 = await resubscribed;
  assert.equal(sub2.recoverAsked, true);
  assert.equal(sub2.recovered, true); // same server, history kept: nothing lost
  await c.publish("auth/carol", 2);
  assert.deepEqual((await take(sub, 1)).map((p) => [p.offset, p.data]), [[2, 2]]);
});
