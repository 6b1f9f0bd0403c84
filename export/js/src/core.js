// What Node.js and the browser share: the manifest's checks, input validation, the
// check sample (safetensors) and output comparison, all on bytes already read.
// No I/O here: src/node.js reads files, src/browser.js fetches them.
//
// The rules are the Python runtime's (jaxmint_runtime._trust, _predictor, _format),
// with the same messages where the situation is the same; docs/deployment.md lists
// what each side checks.

import Ajv2020 from "ajv/dist/2020.js";

import schema from "../manifest.schema.json" with { type: "json" };

export const FORMAT_NAME = "jaxmint-artifact";
export const FORMAT_VERSION = 2;
export const MANIFEST = "manifest.json";
export const MAX_MANIFEST_BYTES = 16 * 1024 * 1024;
const MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024;
const MAX_LABEL_CHARS = 1024;
const UNPRINTABLE = /[\p{C}\p{Zl}\p{Zp}]|(?! )\p{Zs}/u; // as Python's str.isprintable

/** An artifact cannot be loaded safely; the message names the file and the reason. */
export class ArtifactError extends Error {
  name = "ArtifactError";
}

/** Inputs that do not fit the model: wrong names, dtypes, shapes or values. */
export class InputError extends Error {
  name = "InputError";
}

const validateSchema = new Ajv2020({ allErrors: false, strict: false }).compile(schema);

/** The manifest from its bytes: bounded, JSON, a jaxmint manifest the schema accepts. */
export function parseManifest(bytes, where) {
  if (bytes.byteLength > MAX_MANIFEST_BYTES) {
    throw new ArtifactError(
      `${where}: ${bytes.byteLength} bytes, more than the ${MAX_MANIFEST_BYTES} a manifest may have`,
    );
  }
  let manifest;
  try {
    manifest = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (e) {
    throw new ArtifactError(`${where}: not valid JSON (${e.message})`);
  }
  if (manifest === null || typeof manifest !== "object" || Array.isArray(manifest)) {
    throw new ArtifactError(`${where}: the manifest must be a JSON object`);
  }
  if (manifest.format !== FORMAT_NAME) {
    throw new ArtifactError(`${where}: not a ${FORMAT_NAME} manifest`);
  }
  const version = manifest.format_version;
  if (!Number.isInteger(version) || version < 1) {
    throw new ArtifactError(
      `${where}: field 'format_version' must be a positive integer, got ${String(version).slice(0, 20)}`,
    );
  }
  if (version > FORMAT_VERSION) {
    throw new ArtifactError(
      `${where}: artifact format version ${version} is newer than this runtime reads ` +
        `(up to ${FORMAT_VERSION}); upgrade jaxmint-runtime-js`,
    );
  }
  const targets = manifest.targets ?? { xla: "format 1" }; // format 1 is XLA only
  if (typeof targets !== "object" || !Object.hasOwn(targets, "onnx")) {
    throw new ArtifactError(
      `${where}: no onnx target (it has ${JSON.stringify(Object.keys(targets))}); ` +
        "export with --target onnx",
    );
  }
  if (!validateSchema(manifest)) {
    const error = validateSchema.errors[0];
    const field = error.instancePath.slice(1) || "(top level)";
    throw new ArtifactError(`${where}: field '${field}': ${error.message}`.slice(0, 400));
  }
  return manifest;
}

/** `[path, field]` of every file the ONNX target, the check sample and the labels use;
 * each must be listed in the manifest's files (so it is verified before use). */
export function referencedFiles(manifest) {
  const onnx = manifest.targets.onnx;
  const refs = [[onnx.file, "targets.onnx.file"]];
  onnx.files.forEach((f, i) => refs.push([f, `targets.onnx.files[${i}]`]));
  if (manifest.check) refs.push([manifest.check.file, "check.file"]);
  manifest.outputs.forEach((spec, i) => {
    if (spec.labels) refs.push([spec.labels, `outputs[${i}].labels`]);
  });
  for (const [rel, field] of refs) {
    if (!Object.hasOwn(manifest.files, rel)) {
      throw new ArtifactError(
        `${field} names '${rel}', which is not listed in the manifest's files (so it could not be verified)`,
      );
    }
  }
  return [...new Set(refs.map(([rel]) => rel))];
}

/** The session's graph takes the manifest's inputs and gives its outputs. */
export function checkGraph(manifest, inputNames, outputNames) {
  const file = manifest.targets.onnx.file;
  const have = [...inputNames].sort();
  const want = manifest.inputs.map((s) => s.name).sort();
  if (JSON.stringify(have) !== JSON.stringify(want)) {
    throw new ArtifactError(`${file}: graph inputs ${JSON.stringify(have)} do not match ${JSON.stringify(want)}`);
  }
  const missing = manifest.outputs.map((s) => s.name).filter((n) => !outputNames.includes(n));
  if (missing.length) {
    throw new ArtifactError(
      `${file}: the graph has no outputs ${JSON.stringify(missing)} (it has ${JSON.stringify([...outputNames].sort())})`,
    );
  }
}

/** Size, then sha256 (hex, computed by the caller's `digest(bytes)`) of one listed file. */
export async function verifyBytes(rel, bytes, info, digest, where) {
  if (bytes.byteLength !== info.bytes) {
    throw new ArtifactError(
      `${where}: ${bytes.byteLength} bytes, the manifest says ${info.bytes} (truncated or replaced)`,
    );
  }
  if ((await digest(bytes)) !== info.sha256) {
    throw new ArtifactError(`${where}: sha256 does not match the manifest (file was modified)`);
  }
}

// -- dtypes ---------------------------------------------------------------------------

const ARRAYS = {
  float64: Float64Array,
  float32: Float32Array,
  int64: BigInt64Array,
  int32: Int32Array,
  int16: Int16Array,
  int8: Int8Array,
  uint64: BigUint64Array,
  uint32: Uint32Array,
  uint16: Uint16Array,
  uint8: Uint8Array,
  bool: Uint8Array,
};

function dtypeOf(data) {
  for (const [name, type] of Object.entries(ARRAYS)) {
    if (name !== "bool" && data instanceof type) return name;
  }
  return data?.constructor?.name ?? typeof data;
}

const show = (shape) => `(${shape.join(", ")}${shape.length === 1 ? "," : ""})`;

/** A tensor as this package passes it around: `{dtype, dims, data}` (a typed array). */
export function tensor(dtype, dims, data) {
  return { dtype, dims: [...dims], data };
}

/**
 * Check `inputs` (`{name: {dtype?, dims, data}}`, or one tensor for a one-input model)
 * against the manifest's specs, as the Python runtime does: names, dtypes, shapes
 * (with one consistent `batch`), finite floats, integer ids inside their range.
 * Returns `{arrays, batch}`; throws `InputError` naming the input.
 */
export function validateInputs(specs, inputs, { checkFinite = true } = {}) {
  if (inputs?.data !== undefined && inputs?.dims !== undefined) {
    if (specs.length !== 1) {
      throw new InputError(
        `this model takes several inputs ${JSON.stringify(specs.map((s) => s.name))}: pass an object`,
      );
    }
    inputs = { [specs[0].name]: inputs };
  }
  const expected = specs.map((s) => s.name).sort();
  const given = Object.keys(inputs ?? {}).sort();
  if (JSON.stringify(given) !== JSON.stringify(expected)) {
    const missing = expected.filter((n) => !given.includes(n));
    const unexpected = given.filter((n) => !expected.includes(n));
    throw new InputError(
      `inputs ${JSON.stringify(given)} do not match the model's ${JSON.stringify(expected)}: ` +
        `missing ${JSON.stringify(missing)}, unexpected ${JSON.stringify(unexpected)}`,
    );
  }
  const sizes = {};
  const arrays = {};
  for (const spec of specs) {
    const value = inputs[spec.name];
    const Type = ARRAYS[spec.dtype];
    if (!Type) throw new InputError(`input '${spec.name}': dtype ${spec.dtype} is not supported here`);
    const got = value.dtype ?? dtypeOf(value.data);
    if (got !== spec.dtype || !(value.data instanceof Type)) {
      throw new InputError(`input '${spec.name}' has dtype ${got}, expected ${spec.dtype}`);
    }
    const dims = value.dims;
    if (!Array.isArray(dims) || !dims.every((d) => Number.isInteger(d) && d >= 0)) {
      throw new InputError(`input '${spec.name}': dims must be a list of integers >= 0`);
    }
    const want = show(spec.shape.map((d) => (typeof d === "string" ? d : d)));
    if (dims.length !== spec.shape.length) {
      throw new InputError(`input '${spec.name}' has shape ${show(dims)}, expected ${want}`);
    }
    spec.shape.forEach((dim, i) => {
      if (typeof dim === "string") {
        sizes[dim] ??= dims[i];
        if (sizes[dim] !== dims[i]) {
          throw new InputError(
            `input '${spec.name}' has ${dim}=${dims[i]} but another input has ${dim}=${sizes[dim]}`,
          );
        }
      } else if (dims[i] !== dim) {
        throw new InputError(`input '${spec.name}' has shape ${show(dims)}, expected ${want}`);
      }
    });
    const count = dims.reduce((a, b) => a * b, 1);
    if (value.data.length !== count) {
      throw new InputError(
        `input '${spec.name}' has ${value.data.length} values for shape ${show(dims)} (${count})`,
      );
    }
    if (checkFinite && spec.dtype.startsWith("float")) {
      if (!value.data.every(Number.isFinite)) {
        throw new InputError(`input '${spec.name}' contains NaN or infinity`);
      }
    }
    if (spec.range) checkRange(spec, value.data, dims);
    arrays[spec.name] = tensor(spec.dtype, dims, value.data);
  }
  const batch = sizes.batch;
  if (batch === undefined || batch < 1) {
    throw new InputError(`inputs need a batch of at least one example, got ${batch ?? "None"}`);
  }
  return { arrays, batch };
}

function checkRange(spec, data, dims) {
  const [low, high] = spec.range;
  let lo = null;
  let hi = null;
  let first = -1;
  for (let i = 0; i < data.length; i++) {
    const v = Number(data[i]);
    lo = lo === null || v < lo ? v : lo;
    hi = hi === null || v > hi ? v : hi;
    if (first < 0 && (v < low || v >= high)) first = i;
  }
  if (first < 0) return;
  const index = [];
  for (let rest = first, k = dims.length - 1; k >= 0; k--) {
    index.unshift(rest % dims[k]);
    rest = Math.floor(rest / dims[k]);
  }
  throw new InputError(
    `input '${spec.name}' holds values outside [${low}, ${high}) (min ${lo}, max ${hi}; ` +
      `the first at index ${show(index)}): the model's inputs are ids below ${high}, such ` +
      "as the tokens of its vocabulary",
  );
}

// -- the check sample -------------------------------------------------------------------

const SAFETENSORS_DTYPES = {
  F64: "float64",
  F32: "float32",
  I64: "int64",
  I32: "int32",
  I16: "int16",
  I8: "int8",
  U64: "uint64",
  U32: "uint32",
  U16: "uint16",
  U8: "uint8",
  BOOL: "bool",
};

/**
 * `{name: tensor}` of a safetensors file's bytes (the check sample). The header is
 * untrusted: bounded, a JSON object of tensors with known dtypes, integer shapes and
 * offsets inside the file that match the shape, no two overlapping.
 */
export function readSafetensors(bytes, where) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.byteLength < 8) throw new ArtifactError(`${where}: truncated safetensors header`);
  const n = view.getBigUint64(0, true);
  if (n > BigInt(Math.min(MAX_SAFETENSORS_HEADER, bytes.byteLength - 8))) {
    throw new ArtifactError(`${where}: header size ${n} does not fit the file`);
  }
  let header;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + Number(n))));
  } catch (e) {
    throw new ArtifactError(`${where}: unreadable header (${e.message})`);
  }
  if (header === null || typeof header !== "object" || Array.isArray(header)) {
    throw new ArtifactError(`${where}: the header must be a JSON object of tensors`);
  }
  const start = 8 + Number(n);
  const spans = [];
  const out = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const dtype = SAFETENSORS_DTYPES[info?.dtype];
    if (!dtype) {
      throw new ArtifactError(`${where}: tensor '${name}': unsupported dtype ${String(info?.dtype).slice(0, 20)}`);
    }
    const { shape, data_offsets: offsets } = info;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new ArtifactError(`${where}: tensor '${name}': shape must be a list of integers >= 0`);
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(Number.isSafeInteger)) {
      throw new ArtifactError(`${where}: tensor '${name}': data_offsets must be two integers`);
    }
    const [begin, end] = offsets;
    if (!(0 <= begin && begin <= end && end <= bytes.byteLength - start)) {
      throw new ArtifactError(`${where}: tensor '${name}' lies outside the file`);
    }
    const Type = ARRAYS[dtype];
    if (end - begin !== shape.reduce((a, b) => a * b, 1) * Type.BYTES_PER_ELEMENT) {
      throw new ArtifactError(`${where}: tensor '${name}' has the wrong byte size`);
    }
    spans.push([begin, end, name]);
    const copy = new Uint8Array(bytes.subarray(start + begin, start + end)); // a copy, aligned
    out[name] = tensor(dtype, shape, new Type(copy.buffer, 0, (end - begin) / Type.BYTES_PER_ELEMENT));
  }
  spans.sort((a, b) => a[0] - b[0]);
  for (let i = 1; i < spans.length; i++) {
    if (spans[i][0] < spans[i - 1][1]) {
      throw new ArtifactError(`${where}: tensors '${spans[i - 1][2]}' and '${spans[i][2]}' overlap`);
    }
  }
  return out;
}

/** Why `got` is not `want` within the runtime's tolerance (at least `floor`), or null. */
export function outputMismatch(got, want, floor = 0) {
  if (got.dtype !== want.dtype || JSON.stringify(got.dims) !== JSON.stringify(want.dims)) {
    return `${got.dtype}[${got.dims}] instead of ${want.dtype}[${want.dims}]`;
  }
  if (!want.data.length) return null;
  let [rtol, atol] = want.dtype.startsWith("float") ? [1e-4, 1e-5] : [0, 0];
  if (want.dtype.startsWith("float")) [rtol, atol] = [Math.max(rtol, floor), Math.max(atol, floor)];
  const w = Array.from(want.data, Number);
  const g = Array.from(got.data, Number);
  const scale = Math.max(1, ...w.map(Math.abs));
  let worst = 0;
  let bad = false;
  for (let i = 0; i < w.length; i++) {
    const diff = Math.abs(g[i] - w[i]);
    worst = Math.max(worst, diff);
    if (!(diff <= atol * scale + rtol * Math.abs(w[i]))) bad = true;
  }
  if (!bad) return null;
  return `max abs difference ${worst.toPrecision(3)} (tolerance rtol=${rtol}, atol=${(atol * scale).toPrecision(3)})`;
}

/** The check sample's inputs and expected outputs, by the manifest's names. */
export function checkSample(manifest, tensors, where) {
  const inputs = {};
  const outputs = {};
  const missing = [];
  for (const s of manifest.inputs) {
    const t = tensors[`input/${s.name}`];
    if (t) inputs[s.name] = t;
    else missing.push(s.name);
  }
  for (const s of manifest.outputs) {
    const t = tensors[`output/${s.name}`];
    if (t) outputs[s.name] = t;
    else missing.push(s.name);
  }
  if (missing.length) {
    throw new ArtifactError(`${where}: the check sample lacks ${JSON.stringify(missing.sort())}`);
  }
  return { inputs, outputs };
}

/** `{output name: [label, ...]}` from the labels files' bytes, checked as the runtime does. */
export function parseLabels(manifest, read) {
  const labels = {};
  for (const spec of manifest.outputs) {
    if (!spec.labels) continue;
    let text;
    try {
      text = new TextDecoder("utf-8", { fatal: true }).decode(read(spec.labels));
    } catch {
      throw new ArtifactError(`${spec.labels}: not UTF-8 text`);
    }
    const lines = text.split(/\r\n|\n|\r/);
    if (lines.at(-1) === "") lines.pop();
    const classes = spec.shape.at(-1);
    if (lines.length !== classes) {
      throw new ArtifactError(
        `${spec.labels}: ${lines.length} labels for output '${spec.name}' of shape ` +
          `${JSON.stringify(spec.shape)}; it needs one label per entry of its last dimension`,
      );
    }
    lines.forEach((label, i) => {
      if (label.length > MAX_LABEL_CHARS || UNPRINTABLE.test(label)) {
        throw new ArtifactError(
          `${spec.labels}: line ${i + 1} is not a label (printable, at most ${MAX_LABEL_CHARS} characters)`,
        );
      }
    });
    labels[spec.name] = lines;
  }
  return labels;
}

// -- the loaded model ----------------------------------------------------------------------

/** A loaded artifact: `run(inputs)` validates, then runs the ONNX target with `ort` (the
 * onnxruntime-node or onnxruntime-web module it was opened with). */
export class Predictor {
  constructor({ where, manifest, session, check, labels, ort, engine }) {
    Object.assign(this, { where, manifest, session, check, labels, ort, engine });
    this.inputs = manifest.inputs;
    this.outputs = manifest.outputs;
    this.name = manifest.name;
  }

  /** `{output name: {dtype, dims, data}}` for `inputs` (see `validateInputs`). */
  async run(inputs) {
    const { arrays } = validateInputs(this.inputs, inputs);
    const feeds = {};
    for (const [name, t] of Object.entries(arrays)) feeds[name] = new this.ort.Tensor(t.dtype, t.data, t.dims);
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
          `${this.where}: output '${name}' on the check sample saved at export differs ` +
            `with ${this.engine}: ${why}`,
        );
      }
    }
    return true;
  }
}

/**
 * The last step of loading, once every file in `files` (`{path: bytes}`) was verified:
 * an ONNX Runtime session on the graph and its external data, the graph's names
 * checked, the check sample and labels read, the check sample run (unless
 * `selfCheck: false`).
 */
export async function openVerified({ where, manifest, files, ort, engine, sessionOptions, selfCheck = true }) {
  const onnx = manifest.targets.onnx;
  const dir = onnx.file.includes("/") ? onnx.file.slice(0, onnx.file.lastIndexOf("/") + 1) : "";
  const externalData = onnx.files
    .filter((rel) => rel !== onnx.file)
    .map((rel) => ({ path: rel.slice(dir.length), data: files[rel] }));
  let session;
  try {
    session = await ort.InferenceSession.create(files[onnx.file], {
      graphOptimizationLevel: "all",
      logSeverityLevel: 3,
      ...sessionOptions,
      externalData,
    });
  } catch (e) {
    throw new ArtifactError(`${where}: ${onnx.file}: ONNX Runtime cannot load it (${e.message})`);
  }
  checkGraph(manifest, session.inputNames, session.outputNames);
  const file = manifest.check?.file;
  const check = file ? checkSample(manifest, readSafetensors(files[file], file), file) : null;
  const labels = parseLabels(manifest, (rel) => files[rel]);
  const predictor = new Predictor({ where, manifest, session, check, labels, ort, engine });
  if (selfCheck) await predictor.selfCheck();
  return predictor;
}
