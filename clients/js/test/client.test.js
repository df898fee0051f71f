// ClapClient against a real clap-ws server (--untrained) on 127.0.0.1.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import WebSocket from "ws";

import { ClapClient, ClapError, ConnectionError, TimeoutError, embedOnce } from "../src/index.js";
import { cosine, noise, norm, sameEmbedding, startServer, tone } from "./helpers.js";

let server;
let client;

before(async () => {
  // batches of up to --max-batch (no latency target), so pipelined requests share batches: what this file checks
  // is that each reply still reaches its own promise through them
  server = await startServer({ args: ["--max-batch-ms", "0"] });
  client = new ClapClient(server.url, { timeoutMs: 60_000 });
  await client.connect();
});

after(async () => {
  client?.close();
  await server?.kill("SIGTERM");
});

const close = (a, b, tol = 1e-5) => a.every((x, i) => Math.abs(x - b[i]) <= tol);

test("a single embed resolves to a unit Float32Array of 512", async () => {
  const { embedding } = await client.embed(tone(440, 44100, 2), { sampleRate: 44100 });
  assert.ok(embedding instanceof Float32Array);
  assert.equal(embedding.length, 512);
  assert.ok(Math.abs(norm(embedding) - 1) < 1e-4);
  const json = await client.embed(tone(440, 44100, 2), { sampleRate: 44100, prompts: ["a tone"] });
  assert.equal(json.model, "untrained");
  assert.ok(close(json.embedding, embedding));
  assert.equal(typeof json.similarity["a tone"], "number");
  assert.equal(json.cached, true); // the same sound again: from the server's audio cache, no model time
  assert.equal(json.timing.modelMs, 0);
  const fresh = await client.embed(tone(523, 44100, 2), { sampleRate: 44100, prompts: ["a tone"] });
  assert.equal(fresh.cached, false);
  assert.ok(fresh.timing.modelMs > 0);
});

test("a batch equals single requests", async () => {
  const sounds = [tone(220), noise(3), tone(880, 22050, 0.5)];
  const rates = [48000, 48000, 22050];
  const singles = [];
  for (let i = 0; i < 3; i++) singles.push((await client.embed(sounds[i], { sampleRate: rates[i] })).embedding);
  const batch = await client.embedBatch(sounds.slice(0, 2));
  assert.equal(batch.embeddings.length, 2);
  const { precision } = await client.info();
  for (let i = 0; i < 2; i++) assert.ok(sameEmbedding(batch.embeddings[i], singles[i], precision));
  const scored = await client.embedBatch(sounds.slice(0, 2), { prompts: ["hum", "hiss"] });
  assert.equal(scored.items.length, 2);
  assert.deepEqual(Object.keys(scored.items[1].similarity), ["hum", "hiss"]);
});

test("100 requests pipelined on one connection all resolve with their own embedding", async () => {
  const distinct = [0, 1, 2, 3, 4].map((i) => noise(100 + i, 48000, 0.3));
  const reference = [];
  for (const s of distinct) reference.push((await client.embed(s)).embedding);
  const started = Date.now();
  // Each request differs from its reference by 1e-9 in one sample: other bytes, so not a cache hit, but the same
  // model input once quantised to 16 bits, so the same embedding.
  const variant = (i) => { const s = distinct[i % 5].slice(); s[0] += (i + 1) * 1e-9; return s; };
  const promises = Array.from({ length: 100 }, (_, i) => client.embed(variant(i)));
  await new Promise((r) => setTimeout(r, 20)); // all sent before the first reply can arrive
  assert.ok(client.pending >= 50, `expected many in flight, saw ${client.pending}`);
  const results = await Promise.all(promises);
  const info = await client.info();
  results.forEach((r, i) => {
    // its own sound's embedding (other batches: within the precision's bound), and nearer to it than to the others
    assert.ok(sameEmbedding(r.embedding, reference[i % 5], info.precision), `request ${i} strayed from its sound`);
    const nearest = reference.map((e) => cosine(r.embedding, e)).reduce((best, c, j, all) => (c > all[best] ? j : best), 0);
    assert.equal(nearest, i % 5, `request ${i} got another's reply`);
  });
  assert.ok(cosine(reference[0], reference[1]) < 0.9995);
  assert.ok(info.batches < info.items, "the server batched them");
  assert.ok(Date.now() - started < 120_000);
});

test("ids: JSON replies of different kinds come back to their own promises", async () => {
  const [a, info, text, b] = await Promise.all([
    client.embed(tone(300), { prompts: ["x"] }),
    client.info(),
    client.embedText(["a bright bell", "low rumble"]),
    client.embed(noise(9), { references: [new Float32Array(512).fill(0.1)] }),
  ]);
  assert.equal(a.embedding.length, 512);
  assert.equal(info.model, "untrained");
  assert.equal(text.length, 2);
  assert.ok(text[0] instanceof Float32Array && Math.abs(norm(text[0]) - 1) < 1e-4);
  assert.equal(b.referenceSimilarity.length, 1);
});

test("server errors reject with ClapError carrying the code; the client goes on", async () => {
  await assert.rejects(client.embed(tone(), { sampleRate: 1000 }), (e) => e instanceof ClapError && e.code === "bad_sample_rate");
  await assert.rejects(client.embed(new Float32Array(0)), (e) => e.code === "bad_audio");
  await assert.rejects(client.novelty("no-such-archive", [tone()], { audio: true }), (e) => e.code === "unknown_archive");
  await assert.rejects(client.request({ op: "explode" }), (e) => e.code === "unknown_op" && /explode/.test(e.message));
  assert.equal((await client.embed(tone())).embedding.length, 512);
});

test("archives and novelty", async () => {
  const sounds = [200, 400, 800, 1600].map((f) => tone(f, 48000, 0.5));
  const { embeddings } = await client.embedBatch(sounds);
  const added = await client.archiveAdd("js-run", embeddings, { ids: ["a", "b", "c", "d"] });
  assert.deepEqual(added, { added: 4, count: 4 });
  const novelty = await client.novelty("js-run", [embeddings[0], embeddings[3]], { k: 2 });
  const expected = (q) => {
    const sims = embeddings.map((e) => cosine(q, e)).sort((x, y) => y - x);
    return (2 - sims[0] - sims[1]) / 2;
  };
  assert.ok(Math.abs(novelty[0] - expected(embeddings[0])) < 1e-5);
  const [[top]] = await client.archiveSearch("js-run", [embeddings[2]], { topK: 1 });
  assert.equal(top.id, "c");
  assert.equal((await client.archiveInfo("js-run")).count, 4);
  assert.equal(await client.archiveDrop("js-run"), 4);
});

test("a request that outlives its timeout rejects with TimeoutError, and the connection stays usable", async () => {
  const slow = client.embed(noise(5, 48000, 30), { timeoutMs: 5 });
  await assert.rejects(slow, (e) => e instanceof TimeoutError && e.code === "timeout");
  const after = await client.embed(tone(500));
  assert.equal(after.embedding.length, 512); // the late reply was recognised and dropped
});

test("close() settles every pending promise", async () => {
  const c = new ClapClient(server.url);
  await c.connect();
  const inflight = Array.from({ length: 10 }, (_, i) => c.embed(noise(50 + i)));
  c.close();
  const settled = await Promise.allSettled(inflight);
  assert.ok(settled.every((s) => s.status === "rejected" && s.reason instanceof ConnectionError));
  await assert.rejects(c.embed(tone()), (e) => e.code === "closed");
});

test("the legacy one-shot pattern: a fresh ws socket per sound, sample rate in the URL", async () => {
  for (let i = 0; i < 3; i++) {
    const reply = await new Promise((resolve, reject) => {
      const ws = new WebSocket(`${server.url}?ckpt_dir=/tmp/ckpt&sample_rate=44100&mfcc_focus=1`);
      ws.binaryType = "arraybuffer";
      ws.on("open", () => ws.send(tone(300 + 100 * i, 44100, 1).buffer));
      ws.on("message", (data) => { ws.close(1000); resolve(JSON.parse(data.toString())); });
      ws.on("error", reject);
    });
    assert.equal(reply.features.length, 512);
    assert.deepEqual(reply.features, reply.embedding);
  }
  const viaHelper = await embedOnce(server.url, tone(300, 44100, 1), { sampleRate: 44100 });
  const viaClient = await client.embed(tone(300, 44100, 1), { sampleRate: 44100 });
  assert.ok(close(viaHelper.embedding, viaClient.embedding, 1e-4));
});
