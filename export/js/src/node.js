// Node.js: load an artifact directory's ONNX target with onnxruntime-node.
//
//   import { load } from "jaxmint-runtime-js";
//   const model = await load("artifacts/digits_mlp");
//   const { output } = await model.run({ x: { dims: [1, 64], data: new Float32Array(64) } });
//
// Before ONNX Runtime opens a byte, the directory is checked as the Python runtime
// checks it: the manifest bounded and valid against the shipped JSON Schema; no
// symlink, hard link, device or unlisted file anywhere in the directory; every file
// the ONNX target, the check sample and the labels use listed, of its listed size
// and sha256.

import { createHash } from "node:crypto";
import { constants, promises as fs } from "node:fs";
import path from "node:path";

import ort from "onnxruntime-node";

import {
  ArtifactError,
  MANIFEST,
  MAX_MANIFEST_BYTES,
  checkGraph,
  checkSample,
  outputMismatch,
  parseLabels,
  parseManifest,
  readSafetensors,
  referencedFiles,
  tensor,
  validateInputs,
  verifyBytes,
} from "./core.js";

export { ArtifactError, InputError, tensor } from "./core.js";

const sha256 = async (bytes) => createHash("sha256").update(bytes).digest("hex");

/** Read a regular file (never through a symlink) of at most `limit` bytes. */
async function readRegular(file, limit) {
  let handle;
  try {
    handle = await fs.open(file, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch (e) {
    if (e.code === "ENOENT") throw e;
    throw new ArtifactError(`${file}: cannot be opened safely (${e.code})`);
  }
  try {
    const info = await handle.stat();
    if (!info.isFile()) throw new ArtifactError(`${file}: not a regular file`);
    if (info.size > limit) {
      throw new ArtifactError(`${file}: ${info.size} bytes, more than the ${limit} expected`);
    }
    const bytes = Buffer.alloc(info.size);
    const { bytesRead } = await handle.read(bytes, 0, info.size, 0);
    return bytes.subarray(0, bytesRead);
  } finally {
    await handle.close();
  }
}

/** No symlink, hard link, device or unlisted file anywhere under `directory`. */
async function checkTree(directory, listed) {
  const walk = async (dir) => {
    for (const entry of await fs.readdir(dir, { withFileTypes: true })) {
      const full = path.join(dir, entry.name);
      const rel = path.relative(directory, full).split(path.sep).join("/");
      const info = await fs.lstat(full);
      if (info.isSymbolicLink()) {
        throw new ArtifactError(`${full}: a symlink inside the artifact is refused`);
      }
      if (info.isDirectory()) {
        await walk(full);
        continue;
      }
      if (!info.isFile()) {
        throw new ArtifactError(`${full}: not a regular file (a device or a pipe is refused)`);
      }
      if (info.nlink > 1) {
        throw new ArtifactError(
          `${full}: a hard link (it has ${info.nlink} names) is refused; copy the file`,
        );
      }
      if (rel !== MANIFEST && !Object.hasOwn(listed, rel)) {
        throw new ArtifactError(`${full}: not part of the artifact (not in the manifest); remove it`);
      }
    }
  };
  await walk(directory);
}

/** A loaded artifact: `run(inputs)` validates, then runs the ONNX target. */
export class Predictor {
  constructor(directory, manifest, session, check, labels) {
    this.directory = directory;
    this.manifest = manifest;
    this.session = session;
    this.check = check;
    this.labels = labels;
    this.inputs = manifest.inputs;
    this.outputs = manifest.outputs;
    this.name = manifest.name;
  }

  /** `{output name: {dtype, dims, data}}` for `inputs` (see `validateInputs`). */
  async run(inputs) {
    const { arrays } = validateInputs(this.inputs, inputs);
    const feeds = {};
    for (const [name, t] of Object.entries(arrays)) {
      feeds[name] = new ort.Tensor(t.dtype === "bool" ? "bool" : t.dtype, t.data, t.dims);
    }
    const results = await this.session.run(feeds);
    const out = {};
    for (const spec of this.outputs) {
      const r = results[spec.name];
      out[spec.name] = tensor(r.type, r.dims.map(Number), r.data);
    }
    return out;
  }

  /** Run the check sample saved at export and compare (1e-2 relative, as the Python
   * runtime's `self_check`); `ArtifactError` naming the output if they differ. */
  async selfCheck() {
    if (!this.check) return false;
    const got = await this.run(this.check.inputs);
    for (const [name, want] of Object.entries(this.check.outputs)) {
      const why = outputMismatch(got[name], want, 1e-2);
      if (why !== null) {
        throw new ArtifactError(
          `${this.directory}: output '${name}' on the check sample saved at export differs ` +
            `with onnxruntime-node: ${why}`,
        );
      }
    }
    return true;
  }
}

/**
 * Check and load `directory`'s ONNX target.
 * Options: `executionProviders` (default `["cpu"]`), `intraOpNumThreads`,
 * `selfCheck` (default true: run the check sample once).
 */
export async function load(directory, options = {}) {
  directory = path.resolve(directory);
  const where = path.join(directory, MANIFEST);
  let raw;
  try {
    raw = await readRegular(where, MAX_MANIFEST_BYTES);
  } catch (e) {
    if (e.code === "ENOENT") {
      throw new ArtifactError(`${directory} is not an artifact: it has no ${MANIFEST}`);
    }
    throw e;
  }
  const manifest = parseManifest(raw, where);
  const used = referencedFiles(manifest);
  await checkTree(directory, manifest.files);
  const files = {};
  for (const [rel, info] of Object.entries(manifest.files)) {
    const file = path.join(directory, rel);
    let bytes;
    try {
      bytes = await readRegular(file, info.bytes);
    } catch (e) {
      if (e.code === "ENOENT") throw new ArtifactError(`${file}: listed in the manifest but missing`);
      if (e instanceof ArtifactError && e.message.includes("more than")) {
        throw new ArtifactError(`${file}: larger than the manifest says (truncated or replaced)`);
      }
      throw e;
    }
    await verifyBytes(rel, bytes, info, sha256, file);
    if (used.includes(rel)) files[rel] = bytes;
  }
  const onnx = manifest.targets.onnx;
  const external = onnx.files
    .filter((rel) => rel !== onnx.file)
    .map((rel) => ({ path: path.posix.relative(path.posix.dirname(onnx.file), rel), data: files[rel] }));
  let session;
  try {
    session = await ort.InferenceSession.create(files[onnx.file], {
      executionProviders: options.executionProviders ?? ["cpu"],
      intraOpNumThreads: options.intraOpNumThreads ?? 1,
      interOpNumThreads: 1,
      graphOptimizationLevel: "all",
      externalData: external,
      logSeverityLevel: 3,
    });
  } catch (e) {
    throw new ArtifactError(`${path.join(directory, onnx.file)}: ONNX Runtime cannot load it (${e.message})`);
  }
  checkGraph(manifest, session.inputNames, session.outputNames);
  const check = manifest.check
    ? checkSample(manifest, readSafetensors(files[manifest.check.file], manifest.check.file), manifest.check.file)
    : null;
  const labels = parseLabels(manifest, (rel) => files[rel]);
  const predictor = new Predictor(directory, manifest, session, check, labels);
  if (options.selfCheck ?? true) await predictor.selfCheck();
  return predictor;
}
