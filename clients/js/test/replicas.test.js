// Serving from many machines (docs/deploy.md): two replicas, a ClapPool over them, one replica stopped with
// SIGTERM midway. Every request is answered exactly once: by one replica, never lost, never run twice.
import assert from "node:assert/strict";
import { test } from "node:test";

import { ClapPool } from "../src/index.js";
import { noise, startServer } from "./helpers.js";

test("a replica stopped with SIGTERM midway: every request answered exactly once", async () => {
  const [a, b] = await Promise.all([startServer({ args: ["--audio-cache", "0"] }),
    startServer({ args: ["--audio-cache", "0", "--shutdown-timeout", "60"] })]);
  try {
    const pool = new ClapPool([a.url, b.url], { timeoutMs: 120_000, reconnect: false });
    await pool.connect();
    const total = 48;
    const results = Array.from({ length: total }, (_, i) => pool.embed(noise(1000 + i, 48000, 0.5)));
    await new Promise((r) => setTimeout(r, 400)); // both replicas have work in flight
    const code = await b.kill("SIGTERM");
    assert.equal(code, 0, "the replica drained and exited cleanly");
    const settled = await Promise.allSettled(results);
    assert.deepEqual(settled.filter((s) => s.status === "rejected").map((s) => s.reason.message), []);
    assert.ok(settled.every((s) => s.value.embedding.length === 512));
    const servedByB = Number(/clap-ws stopped: \d+ batches, (\d+) items served/.exec(b.log())[1]);
    const [infoA] = await pool.info();
    assert.ok(servedByB > 0, "the stopped replica had served part of the work");
    assert.equal(infoA.items + servedByB, total, "each request ran on exactly one replica, once");
    pool.close();
  } finally {
    await Promise.all([a.kill("SIGTERM"), b.kill("SIGKILL")]);
  }
});
