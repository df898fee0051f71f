// One evolution loop against clap-ws: render sounds, embed them as one batch, score them against
// text prompts, read their novelty against the run's archive, keep the best, and add them.
//
//   node examples/generation-loop.js                       # server at ws://127.0.0.1:32051/clap
//   CLAP_WS_URL=ws://host:port/clap GENERATIONS=5 node examples/generation-loop.js
import { ClapClient } from "clap-ws-client";

const url = process.env.CLAP_WS_URL ?? "ws://127.0.0.1:32051/clap";
const generations = Number(process.env.GENERATIONS ?? 3);
const populationSize = Number(process.env.POPULATION ?? 16);
const sampleRate = 44100;
const prompts = ["a metallic bell", "a warm analogue pad"];

// A toy synthesiser: a genome is [frequency, brightness, decay]; it renders one second of sound.
function render([freq, bright, decay]) {
  const out = new Float32Array(sampleRate);
  for (let i = 0; i < out.length; i++) {
    const t = i / sampleRate;
    const env = Math.exp(-decay * t);
    out[i] = 0.4 * env * (Math.sin(2 * Math.PI * freq * t) + bright * Math.sin(2 * Math.PI * 2.76 * freq * t));
  }
  return out;
}
const mutate = ([f, b, d]) => [f * (0.8 + 0.4 * Math.random()), Math.min(1, Math.max(0, b + 0.2 * (Math.random() - 0.5))), Math.max(0.5, d * (0.8 + 0.4 * Math.random()))];

const client = new ClapClient(url);
const archive = `example-${Date.now()}`;
let population = Array.from({ length: populationSize }, () => [100 + 900 * Math.random(), Math.random(), 1 + 5 * Math.random()]);

for (let g = 0; g < generations; g++) {
  const sounds = population.map(render);
  // One round trip: embeddings, similarity to each prompt, novelty against the archive (null while
  // it holds fewer than k sounds), and the sounds added to the archive afterwards.
  const { items } = await client.embedBatch(sounds, {
    sampleRate, prompts, archive, k: 5, archiveAdd: true, ids: population.map((_, i) => `g${g}-${i}`),
  });
  const scored = items.map((item, i) => ({
    genome: population[i],
    fitness: Math.max(...prompts.map((p) => item.similarity[p])),
    novelty: item.novelty ?? 0,
  }));
  scored.sort((a, b) => b.fitness + b.novelty - (a.fitness + a.novelty));
  const best = scored[0];
  console.log(`generation ${g}: best fitness ${best.fitness.toFixed(3)}, novelty ${best.novelty.toFixed(3)}, archive ${items[0].archiveCount}`);
  const parents = scored.slice(0, Math.max(2, populationSize / 4)).map((s) => s.genome);
  population = Array.from({ length: populationSize }, (_, i) => mutate(parents[i % parents.length]));
}

const novelty = await client.novelty(archive, (await client.embedBatch(population.slice(0, 2).map(render), { sampleRate })).embeddings, { k: 5 });
console.log(`novelty of two offspring: ${novelty.map((n) => n.toFixed(3)).join(", ")}`);
await client.archiveDrop(archive);
client.close();
