// Compiled by `npm run typecheck` (tsc --noEmit): the hand-written types must describe real usage.
import { ClapClient, ClapError, ClapPool, embedOnce, type EmbedResult } from "clap-ws-client";

async function usage(): Promise<void> {
  const client = new ClapClient("ws://127.0.0.1:32051/clap", { timeoutMs: 10_000, backoff: { initialMs: 100 } });
  const sound = new Float32Array(48000);
  const one: EmbedResult = await client.embed(sound, { sampleRate: 48000, prompts: ["a bell"], topK: 3 });
  const vector: Float32Array = one.embedding;
  const sim: number | undefined = one.similarity?.["a bell"];
  const batch = await client.embedBatch([sound, sound], { archive: "run", archiveAdd: true, ids: [1, 2] });
  const novelty: number | null | undefined = batch.items?.[0].novelty;
  const texts: Float32Array[] = await client.embedText(["a bell"]);
  const matches = await client.search({ text: "bell", audio: sound, alpha: 0.3, tags: ["drums"] });
  const path: string = matches[0].path;
  const n: number[] = await client.novelty("run", batch.embeddings, { k: 15 });
  const pool = new ClapPool(["ws://a/clap", "ws://b/clap"], { strategy: "round-robin" });
  await pool.archiveAdd("run", texts);
  const legacy = await embedOnce("ws://127.0.0.1:32051/clap", sound, { sampleRate: 44100 });
  try {
    await client.info();
  } catch (e) {
    if (e instanceof ClapError) console.log(e.code, vector, sim, novelty, path, n, legacy.embedding);
  }
  client.close();
  pool.close();
}
void usage;
