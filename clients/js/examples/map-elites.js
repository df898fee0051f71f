// A small MAP-Elites loop on clap-ws's behaviour descriptors: every rendered sound is placed in a grid
// over the server's learned projection, and each cell keeps its fittest sound. Every few generations
// the projection is refitted on the run's archive (in the background: embedding never waits for it),
// and the grid is rebuilt in the new descriptor space.
//
//   node examples/map-elites.js                      # server at ws://127.0.0.1:32051/clap
//   CLAP_WS_URL=ws://host:port/clap GENERATIONS=12 REFIT_EVERY=4 node examples/map-elites.js
import { ClapClient } from "clap-ws-client";

const url = process.env.CLAP_WS_URL ?? "ws://127.0.0.1:32051/clap";
const generations = Number(process.env.GENERATIONS ?? 9);
const batch = Number(process.env.BATCH ?? 16);
const refitEvery = Number(process.env.REFIT_EVERY ?? 3);
const cells = 4; // per descriptor dimension: a 4 x 4 grid over the first two descriptors
const sampleRate = 22050;
const prompt = "a bright metallic bell";

// A toy FM synthesiser: genome = [carrier Hz, ratio, index, decay]; half a second of sound.
function render([carrier, ratio, index, decay]) {
  const out = new Float32Array(sampleRate / 2);
  for (let i = 0; i < out.length; i++) {
    const t = i / sampleRate;
    out[i] = 0.4 * Math.exp(-decay * t) * Math.sin(2 * Math.PI * carrier * t + index * Math.sin(2 * Math.PI * carrier * ratio * t));
  }
  return out;
}
const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
const randomGenome = () => [100 + 1500 * Math.random(), 0.5 + 4 * Math.random(), 10 * Math.random(), 1 + 8 * Math.random()];
const mutate = ([c, r, i, d]) => [clamp(c * (0.85 + 0.3 * Math.random()), 50, 4000), clamp(r + 0.5 * (Math.random() - 0.5), 0.25, 8),
  clamp(i + 2 * (Math.random() - 0.5), 0, 20), clamp(d * (0.8 + 0.4 * Math.random()), 0.5, 12)];
const cellOf = (descriptor) => descriptor.slice(0, 2).map((v) => clamp(Math.floor(v * cells), 0, cells - 1)).join(",");

const client = new ClapClient(url, { timeoutMs: 120_000 });
const archive = `map-elites-${Date.now()}`;
let grid = new Map(); // cell -> {genome, fitness, embedding}
let version = null;
const seen = []; // every elite ever kept, to rebuild the grid when the projection changes

async function evaluate(genomes, g) {
  const { embeddings, items } = await client.embedBatch(genomes.map(render), {
    sampleRate, prompts: [prompt], descriptor: true, archive, archiveAdd: true, ids: genomes.map((_, i) => `g${g}-${i}`),
  });
  return genomes.map((genome, i) => ({
    genome, embedding: embeddings[i], fitness: items[i].similarity[prompt],
    descriptor: items[i].behaviorDescriptor, version: items[i].projectionVersion,
  }));
}

function place(candidate) {
  if (!candidate.descriptor) return false; // no projection yet: nothing to place by
  const cell = cellOf(candidate.descriptor);
  const incumbent = grid.get(cell);
  if (incumbent && incumbent.fitness >= candidate.fitness) return false;
  grid.set(cell, candidate);
  return true;
}

for (let g = 0; g < generations; g++) {
  const elites = [...grid.values()];
  const genomes = Array.from({ length: batch }, (_, i) => (elites.length && i % 4 ? mutate(elites[Math.floor(Math.random() * elites.length)].genome) : randomGenome()));
  const results = await evaluate(genomes, g);
  if (results[0].version !== version) { // a new projection: re-place every elite with fresh descriptors
    version = results[0].version;
    const again = seen.length ? await evaluate(seen.map((e) => e.genome), `re${g}`) : [];
    grid = new Map();
    again.forEach(place);
  }
  let kept = 0;
  for (const r of results) if (place(r)) { kept += 1; seen.push(r); }
  console.log(`generation ${g}: projection ${version ?? "none"}, ${kept} new elites, ${grid.size} of ${cells * cells} cells filled`);
  if ((g + 1) % refitEvery === 0) {
    const { nextVersion } = await client.fitProjection(archive, { dims: 2, epochs: 10 });
    for (let tries = 0; tries < 600; tries++) { // a small archive fits in seconds; never wait forever
      const info = await client.projectionInfo();
      if (!info.fitting && info.installed?.version >= nextVersion) break;
      if (info.lastError) throw new Error(info.lastError);
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}
const best = [...grid.values()].sort((a, b) => b.fitness - a.fitness)[0];
console.log(`best: fitness ${best.fitness.toFixed(3)} in cell ${cellOf(best.descriptor)} (projection ${version})`);
client.close();
