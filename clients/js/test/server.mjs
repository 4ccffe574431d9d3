// Start and stop a real `tidings serve` for the tests (a private subprocess per test file).
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "..", "..", "..");
export const PYTHON = process.env.TIDINGS_PYTHON ?? "/work/main/.venv/bin/python";
export const TIMEOUT = 10_000;

export function freePort() {
  return new Promise((resolveP, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolveP(port));
    });
  });
}

/** Wait (bounded) until `check()` is truthy; poll, since there is no event to wait on. */
export async function until(check, what, timeout = TIMEOUT) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A `tidings serve` subprocess on `port` (a free one by default). */
export class Server {
  constructor({ port, args = [], env = {} } = {}) {
    this.port = port;
    this.args = args;
    this.env = env;
    this.proc = undefined;
    this.output = "";
  }

  get base() {
    return `http://127.0.0.1:${this.port}`;
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  async start() {
    if (this.port === undefined) this.port = await freePort();
    const proc = spawn(
      PYTHON,
      ["-m", "tidings.server.cli", "serve", "--host", "127.0.0.1", "--port", String(this.port), "--log-level", "warning", ...this.args],
      {
        env: { ...process.env, PYTHONPATH: join(repo, "src"), ...this.env },
        stdio: ["ignore", "pipe", "pipe"],
      },
    );
    this.proc = proc;
    const exited = new Promise((r) => proc.once("exit", (code, signal) => r({ code, signal })));
    this.exited = exited;
    proc.stdout.on("data", (d) => (this.output += d));
    proc.stderr.on("data", (d) => (this.output += d));
    let gone = false;
    void exited.then(() => (gone = true));
    await until(async () => {
      if (gone) throw new Error(`tidings serve exited early:\n${this.output}`);
      try {
        const res = await fetch(`${this.base}/health`);
        return res.status === 200;
      } catch {
        return false;
      }
    }, `tidings serve on port ${this.port}`, 30_000);
    return this;
  }

  /** Stop it by its pid: SIGTERM (or SIGKILL), waiting for the exit. */
  async stop(signal = "SIGTERM") {
    const proc = this.proc;
    if (proc === undefined || proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill(signal);
    const timer = setTimeout(() => proc.kill("SIGKILL"), 8000);
    const result = await this.exited;
    clearTimeout(timer);
    this.proc = undefined;
    return result;
  }

  /** POST to the HTTP API. */
  async api(method, body, headers = {}) {
    const res = await fetch(`${this.base}/api/${method}`, {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: JSON.stringify(body),
    });
    return { status: res.status, body: await res.json() };
  }
}

/** Collect what an async iterable yields until `count` items (bounded by a timeout). */
export async function take(iterable, count, timeout = TIMEOUT) {
  const out = [];
  const iterator = iterable[Symbol.asyncIterator]();
  const deadline = Date.now() + timeout;
  while (out.length < count) {
    const left = deadline - Date.now();
    let timer;
    const result = await Promise.race([
      iterator.next(),
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`got ${out.length} of ${count} items in ${timeout} ms: ${JSON.stringify(out).slice(0, 500)}`)), Math.max(1, left));
      }),
    ]);
    clearTimeout(timer);
    if (result.done) break;
    out.push(result.value);
  }
  return out;
}

/** The next emission of `event` on an emitter with `on(event, fn) -> off`, bounded. */
export function nextEvent(emitter, event, predicate = () => true, timeout = TIMEOUT) {
  return new Promise((resolveP, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${event} event within ${timeout} ms`));
    }, timeout);
    const off = emitter.on(event, (value) => {
      if (!predicate(value)) return;
      clearTimeout(timer);
      off();
      resolveP(value);
    });
  });
}
