// The README's generation loop runs as written against a real server.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

import { startServer } from "./helpers.js";

let server;
before(async () => { server = await startServer(); });
after(async () => { await server?.kill("SIGTERM"); });

test("examples/generation-loop.js runs three generations", async () => {
  const script = fileURLToPath(new URL("../examples/generation-loop.js", import.meta.url));
  const { stdout } = await promisify(execFile)(process.execPath, [script], {
    env: { ...process.env, CLAP_WS_URL: server.url, GENERATIONS: "3", POPULATION: "8" }, timeout: 300_000,
  });
  const lines = stdout.trim().split("\n");
  assert.match(lines[0], /^generation 0: best fitness -?\d\.\d{3}, novelty 0\.000, archive 8$/);
  assert.match(lines[2], /^generation 2: best fitness -?\d\.\d{3}, novelty \d\.\d{3}, archive 24$/);
  assert.match(lines[3], /^novelty of two offspring: \d\.\d{3}, \d\.\d{3}$/);
});

test("examples/map-elites.js fills a grid over descriptors that the server refits", async () => {
  const script = fileURLToPath(new URL("../examples/map-elites.js", import.meta.url));
  const { stdout } = await promisify(execFile)(process.execPath, [script], {
    env: { ...process.env, CLAP_WS_URL: server.url, GENERATIONS: "5", BATCH: "8", REFIT_EVERY: "2" }, timeout: 300_000,
  });
  const lines = stdout.trim().split("\n");
  assert.match(lines[0], /^generation 0: projection none, 0 new elites, 0 of 16 cells filled$/);
  assert.match(lines[2], /^generation 2: projection 1, \d+ new elites, [1-9]\d* of 16 cells filled$/);
  assert.match(lines[4], /^generation 4: projection 2, /);
  assert.match(lines[5], /^best: fitness -?\d\.\d{3} in cell \d,\d \(projection 2\)$/);
});
