// The browser: load an artifact served over HTTP and run its ONNX target with
// onnxruntime-web (WebAssembly).
//
//   import { loadUrl } from "jaxmint-runtime-js/browser";
//   const model = await loadUrl("/artifacts/digits/");
//   const { output } = await model.run({ x: { dims: [1, 64], data: pixels } });
//
// What is checked before ONNX Runtime reads a byte: the manifest (bounded, valid
// against the shipped JSON Schema, an onnx target), and every file the ONNX target,
// the check sample and the labels use: listed, fetched from inside the artifact's
// URL, of its listed size and sha256 (Web Crypto). A web server cannot be asked
// for its directory listing, so unlisted files and links are the server's business.

import * as ort from "onnxruntime-web";

import {
  ArtifactError,
  MANIFEST,
  MAX_MANIFEST_BYTES,
  openVerified,
  parseManifest,
  referencedFiles,
  verifyBytes,
} from "./core.js";

export { ArtifactError, InputError, Predictor, tensor } from "./core.js";

const hex = (buffer) => Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
const sha256 = async (bytes) => hex(await crypto.subtle.digest("SHA-256", bytes));

/** The body of `url`, refused past `limit` bytes (by Content-Length, then as it streams). */
async function fetchBounded(url, limit, fetcher) {
  const response = await fetcher(url, { credentials: "same-origin", redirect: "error" });
  if (!response.ok) throw new ArtifactError(`${url}: HTTP ${response.status}`);
  const declared = Number(response.headers.get("content-length") ?? NaN);
  if (declared > limit) {
    throw new ArtifactError(`${url}: ${declared} bytes, more than the ${limit} expected`);
  }
  const reader = response.body.getReader();
  const chunks = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel();
      throw new ArtifactError(`${url}: more than the ${limit} bytes expected`);
    }
    chunks.push(value);
  }
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, at);
    at += chunk.byteLength;
  }
  return bytes;
}

/**
 * Check and load the artifact at `base` (a URL ending in `/`).
 * Options: `fetch` (default `globalThis.fetch`), `selfCheck` (default true),
 * `wasmPaths` (where onnxruntime-web's .wasm and .mjs files are served).
 */
export async function loadUrl(base, options = {}) {
  const fetcher = options.fetch ?? globalThis.fetch.bind(globalThis);
  const root = new URL(base, globalThis.location?.href);
  if (!root.pathname.endsWith("/")) root.pathname += "/";
  if (options.wasmPaths) ort.env.wasm.wasmPaths = options.wasmPaths;
  ort.env.wasm.numThreads = 1; // no cross-origin isolation needed
  const where = new URL(MANIFEST, root).href;
  const manifest = parseManifest(await fetchBounded(where, MAX_MANIFEST_BYTES, fetcher), where);
  const files = {};
  for (const rel of referencedFiles(manifest)) {
    const url = new URL(rel, root);
    if (!url.href.startsWith(root.href)) throw new ArtifactError(`${rel}: outside the artifact`);
    const info = manifest.files[rel];
    const bytes = await fetchBounded(url.href, info.bytes, fetcher);
    await verifyBytes(rel, bytes, info, sha256, url.href);
    files[rel] = bytes;
  }
  return openVerified({
    where: root.href,
    manifest,
    files,
    ort,
    engine: "onnxruntime-web",
    sessionOptions: { executionProviders: ["wasm"] },
    selfCheck: options.selfCheck ?? true,
  });
}
