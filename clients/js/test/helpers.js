// Test helpers: real clap-ws servers (--untrained) started as child processes, and real audio.
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");

export function python() {
  if (process.env.CLAP_WS_PYTHON) return process.env.CLAP_WS_PYTHON;
  const venv = resolve(REPO, ".venv/bin/python");
  return existsSync(venv) ? venv : "python3";
}

/** Start `clap-ws serve --untrained` on 127.0.0.1; resolves once it listens. */
export function startServer({ port = 0, args = [], timeoutMs = 180_000 } = {}) {
  const proc = spawn(python(), ["-m", "clap_ws", "serve", "--untrained", "--port", String(port), ...args], {
    env: { ...process.env, HF_HUB_OFFLINE: "1", PYTHONPATH: REPO },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  return new Promise((resolveStart, reject) => {
    const timer = setTimeout(() => { proc.kill("SIGKILL"); reject(new Error(`server did not start:\n${log}`)); }, timeoutMs);
    proc.stderr.setEncoding("utf8");
    proc.stderr.on("data", (chunk) => {
      log += chunk;
      const m = log.match(/listening on ws:\/\/127\.0\.0\.1:(\d+)\/clap/);
      if (m && timer) {
        clearTimeout(timer);
        const serverPort = Number(m[1]);
        resolveStart({
          port: serverPort,
          url: `ws://127.0.0.1:${serverPort}/clap`,
          proc,
          log: () => log,
          kill: (signal = "SIGKILL") => new Promise((done) => {
            if (proc.exitCode !== null) return done(proc.exitCode);
            proc.once("exit", (code) => done(code));
            proc.kill(signal);
          }),
        });
      }
    });
    proc.once("exit", (code) => { clearTimeout(timer); reject(new Error(`server exited (${code}):\n${log}`)); });
  });
}

export function tone(freq = 440, sampleRate = 48000, seconds = 1, amp = 0.5) {
  const out = new Float32Array(Math.round(sampleRate * seconds));
  for (let i = 0; i < out.length; i++) out[i] = amp * Math.sin((2 * Math.PI * freq * i) / sampleRate);
  return out;
}

export function noise(seed = 1, sampleRate = 48000, seconds = 1, amp = 0.3) {
  let s = seed >>> 0 || 1;
  const out = new Float32Array(Math.round(sampleRate * seconds));
  for (let i = 0; i < out.length; i++) {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0; // xorshift32
    out[i] = amp * ((s / 0xffffffff) * 2 - 1);
  }
  return out;
}

export function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return dot / Math.sqrt(na * nb);
}

export const norm = (a) => Math.sqrt(a.reduce((s, x) => s + x * x, 0));

// The tolerance policy (docs/precision.md, clap_ws/tolerance.py): the same input embedded in different batches
// is equal to 1e-6 in fp32 and within two bf16 roundings (2**-7 per component, cosine 0.9995) in bf16.
export const BOUNDS = { fp32: { maxAbs: 1e-6, minCosine: 1 - 1e-9 }, bf16: { maxAbs: 2 ** -7, minCosine: 0.9995 } };

export function sameEmbedding(a, b, precision) {
  const { maxAbs, minCosine } = BOUNDS[precision === "fp32" ? "fp32" : "bf16"];
  return a.every((x, i) => Math.abs(x - b[i]) <= maxAbs) && cosine(a, b) >= minCosine;
}
