// ClapPool over two real servers: one is killed mid-run, then restarted on the same port.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { ClapClient, ClapPool, ConnectionError } from "../src/index.js";
import { noise, startServer, tone } from "./helpers.js";

let a;
let b;

before(async () => {
  [a, b] = await Promise.all([startServer(), startServer()]);
});

after(async () => {
  await Promise.all([a?.kill("SIGTERM"), b?.kill("SIGTERM")]);
});

const waitFor = async (predicate, timeoutMs, what) => {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
};

test("requests spread over both servers; a server killed mid-run loses nothing; it is retried and comes back", async () => {
  const pool = new ClapPool([a.url, b.url], { timeoutMs: 90_000, backoff: { initialMs: 100, maxMs: 1000 } });
  await pool.connect();
  assert.equal(pool.healthy.length, 2);

  const sounds = Array.from({ length: 40 }, (_, i) => noise(i + 1, 48000, 0.5));
  const results = sounds.map((s) => pool.embed(s));
  await new Promise((r) => setTimeout(r, 20));
  assert.ok(pool.clients.every((c) => c.pending > 0), "least-pending spreads the work over both servers");
  await new Promise((r) => setTimeout(r, 300));
  const killedPort = b.port;
  await b.kill("SIGKILL"); // mid-run: some of its requests are in flight
  const settled = await Promise.allSettled(results);
  const failed = settled.filter((s) => s.status === "rejected");
  assert.deepEqual(failed.map((f) => f.reason?.message), [], "every request was answered (retried once on the other server)");
  assert.ok(settled.every((s) => s.value.embedding.length === 512));
  assert.deepEqual(pool.healthy.map((c) => c.url), [a.url]);

  // while b is down, new work goes to a
  const during = await pool.embed(tone(330));
  assert.equal(during.embedding.length, 512);

  // b comes back on the same port: the pool's client reconnects with backoff and takes work again
  b = await startServer({ port: killedPort });
  await waitFor(() => pool.healthy.length === 2, 30_000, "the restarted server to be reconnected");
  const again = await Promise.all(Array.from({ length: 6 }, (_, i) => pool.embed(tone(200 + 50 * i))));
  assert.equal(again.length, 6);
  const infos = await pool.info();
  assert.ok(infos.every((i) => i.model === "untrained"));
  assert.ok(infos[1].items > 0, "the restarted server served requests");
  pool.close();
});

test("round-robin alternates, and a pool whose servers are all gone rejects instead of hanging", async () => {
  const pool = new ClapPool([a.url, a.url.replace("/clap", "/")], { strategy: "round-robin" });
  await pool.connect();
  await Promise.all([pool.embed(tone(100)), pool.embed(tone(200))]);
  pool.close();

  const dead = new ClapPool(["ws://127.0.0.1:9/clap", "ws://127.0.0.1:9/"], { timeoutMs: 5000, reconnect: false });
  await assert.rejects(dead.connect(), (e) => e instanceof ConnectionError);
  await assert.rejects(dead.embed(tone()), (e) => e instanceof ConnectionError);
  dead.close();
});

test("a lone client reconnects with backoff after its server restarts", async () => {
  const client = new ClapClient(b.url, { backoff: { initialMs: 50, maxMs: 500 } });
  await client.connect();
  const states = [];
  client.onStateChange((s) => states.push(s));
  const port = b.port;
  const inflight = assert.rejects(client.embed(noise(77, 48000, 10)),
    (e) => e instanceof ConnectionError && e.code === "connection_lost");
  await new Promise((r) => setTimeout(r, 50));
  await b.kill("SIGKILL");
  await inflight; // rejected, not left hanging
  b = await startServer({ port });
  await waitFor(() => client.isOpen, 30_000, "the client to reconnect");
  assert.deepEqual(states.slice(0, 2), ["close", "open"]);
  assert.equal((await client.embed(tone())).embedding.length, 512);
  client.close();
});
