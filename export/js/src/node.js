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
  openVerified,
  parseManifest,
  referencedFiles,
  verifyBytes,
} from "./core.js";

export { ArtifactError, InputError, Predictor, tensor } from "./core.js";

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
  return openVerified({
    where: directory,
    manifest,
    files,
    ort,
    engine: "onnxruntime-node",
    sessionOptions: {
      executionProviders: options.executionProviders ?? ["cpu"],
      intraOpNumThreads: options.intraOpNumThreads ?? 1,
      interOpNumThreads: 1,
    },
    selfCheck: options.selfCheck ?? true,
  });
}
