// node --test export/js/test/ (run by tests/runtime/test_js.py, which exports a fresh
// digits model and records the Python runtime's outputs for it in $JAXMINT_JS_FRESH).

import assert from "node:assert/strict";
import { promises as fs, readFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import { ArtifactError, InputError, load } from "../src/node.js";
import { validateInputs } from "../src/core.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const GOLDEN = path.join(REPO, "tests/golden/digits_onnx_v2");
const readJson = (file) => JSON.parse(readFileSync(file, "utf-8"));

function batch(rows, dtype = Float32Array) {
  return { dims: [rows.length, rows[0].length], data: dtype.from(rows.flat()) };
}

function assertClose(got, want, tol) {
  assert.deepEqual(got.dims, [want.length, want[0].length]);
  want.flat().forEach((w, i) => {
    assert.ok(Math.abs(got.data[i] - w) <= tol * Math.max(1, Math.abs(w)), `${i}: ${got.data[i]} vs ${w}`);
  });
}

describe("the golden ONNX artifact", () => {
  test("loads, passes its check sample and gives the recorded outputs", async () => {
    const expected = readJson(`${GOLDEN}.expected.json`);
    const model = await load(GOLDEN);
    assert.equal(model.name, "digits");
    assert.equal(await model.selfCheck(), true);
    assert.deepEqual(model.labels.output, ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]);
    const { output } = await model.run({ x: batch(expected.x) });
    assertClose(output, expected.output, 1e-5);
  });
});

describe("a freshly exported digits model", { skip: !process.env.JAXMINT_JS_FRESH }, () => {
  test("gives the Python runtime's outputs, batch by batch", async () => {
    const dir = process.env.JAXMINT_JS_FRESH;
    const expected = readJson(path.join(dir, "expected.json"));
    const model = await load(path.join(dir, "artifact"));
    for (const [i, rows] of expected.batches.entries()) {
      const { output } = await model.run({ x: batch(rows) });
      assertClose(output, expected.outputs[i], 1e-6);
    }
  });
});

describe("inputs are validated as the Python runtime does", () => {
  let model;
  before(async () => {
    model = await load(GOLDEN);
  });
  const x = () => ({ dims: [2, 64], data: new Float32Array(128) });
  const cases = [
    ["a wrong name", { image: x() }, /inputs \["image"\] do not match the model's \["x"\]/],
    ["a wrong dtype", { x: { dims: [2, 64], data: new Float64Array(128) } }, /dtype float64, expected float32/],
    ["a wrong shape", { x: { dims: [2, 63], data: new Float32Array(126) } }, /shape \(2, 63\), expected \(batch, 64\)/],
    ["a missing axis", { x: { dims: [64], data: new Float32Array(64) } }, /shape \(64,\), expected/],
    ["too few values", { x: { dims: [2, 64], data: new Float32Array(100) } }, /100 values for shape \(2, 64\)/],
    ["NaN", { x: { dims: [1, 64], data: new Float32Array(64).fill(NaN) } }, /contains NaN or infinity/],
    ["an empty batch", { x: { dims: [0, 64], data: new Float32Array(0) } }, /batch of at least one example/],
    ["no object", null, /do not match the model's/],
  ];
  for (const [what, inputs, message] of cases) {
    test(`refuses ${what}`, async () => {
      await assert.rejects(model.run(inputs), (e) => e instanceof InputError && message.test(e.message));
    });
  }
  test("one tensor for a one-input model", async () => {
    const { output } = await model.run(x());
    assert.deepEqual(output.dims, [2, 10]);
  });
  test("integer ids outside their range name the first one", () => {
    const specs = [{ name: "tokens", dtype: "int32", shape: ["batch", 3], range: [0, 50] }];
    const good = { tokens: { dims: [1, 3], data: Int32Array.from([0, 7, 49]) } };
    assert.equal(validateInputs(specs, good).batch, 1);
    const bad = { tokens: { dims: [2, 3], data: Int32Array.from([0, 7, 49, 3, 50, -1]) } };
    assert.throws(
      () => validateInputs(specs, bad),
      /holds values outside \[0, 50\) \(min -1, max 50; the first at index \(1, 1\)\)/,
    );
  });
});

describe("a hostile artifact is refused before ONNX Runtime reads it", () => {
  let tmp;
  before(async () => {
    tmp = await fs.mkdtemp(path.join(os.tmpdir(), "jaxmint-js-"));
  });
  after(async () => {
    await fs.rm(tmp, { recursive: true, force: true });
  });
  let n = 0;
  async function copy() {
    const dir = path.join(tmp, `a${n++}`);
    await fs.cp(GOLDEN, dir, { recursive: true });
    return dir;
  }
  async function editManifest(dir, edit) {
    const file = path.join(dir, "manifest.json");
    const manifest = JSON.parse(await fs.readFile(file, "utf-8"));
    edit(manifest);
    await fs.writeFile(file, JSON.stringify(manifest));
  }
  const refused = (message) => (e) => e instanceof ArtifactError && message.test(e.message);

  test("a flipped byte in the weights", async () => {
    const dir = await copy();
    const file = path.join(dir, "onnx/model.onnx.data");
    const bytes = await fs.readFile(file);
    bytes[100] ^= 0xff;
    await fs.writeFile(file, bytes);
    await assert.rejects(load(dir), refused(/model.onnx.data: sha256 does not match the manifest/));
  });
  test("a truncated graph", async () => {
    const dir = await copy();
    await fs.truncate(path.join(dir, "onnx/model.onnx"), 10);
    await assert.rejects(load(dir), refused(/10 bytes, the manifest says \d+ \(truncated or replaced\)/));
  });
  test("a symlink to a file outside", async () => {
    const dir = await copy();
    await fs.symlink("/etc/passwd", path.join(dir, "onnx/extra"));
    await assert.rejects(load(dir), refused(/a symlink inside the artifact is refused/));
  });
  test("a listed file replaced by a symlink", async () => {
    const dir = await copy();
    await fs.rm(path.join(dir, "labels.txt"));
    await fs.symlink("/etc/hostname", path.join(dir, "labels.txt"));
    await assert.rejects(load(dir), refused(/labels.txt: a symlink inside the artifact is refused/));
  });
  test("a hard link", async () => {
    const dir = await copy();
    await fs.link(path.join(dir, "labels.txt"), path.join(tmp, `outside${n}`));
    await assert.rejects(load(dir), refused(/a hard link \(it has 2 names\) is refused/));
  });
  test("an unlisted file", async () => {
    const dir = await copy();
    await fs.writeFile(path.join(dir, "onnx/evil.onnx"), "x");
    await assert.rejects(load(dir), refused(/evil.onnx: not part of the artifact/));
  });
  test("a path that climbs out", async () => {
    const dir = await copy();
    await editManifest(dir, (m) => {
      m.targets.onnx.file = "../../etc/passwd";
    });
    await assert.rejects(load(dir), refused(/field 'targets\/onnx\/file': must match pattern/));
  });
  test("a graph file not listed in files", async () => {
    const dir = await copy();
    await editManifest(dir, (m) => {
      m.targets.onnx.file = "check.safetensors.onnx";
    });
    await assert.rejects(load(dir), refused(/targets.onnx.file names 'check.safetensors.onnx', which is not listed/));
  });
  test("a manifest too large, not JSON, from the future, or without an onnx target", async () => {
    let dir = await copy();
    await fs.writeFile(path.join(dir, "manifest.json"), Buffer.alloc(16 * 1024 * 1024 + 1, 32));
    await assert.rejects(load(dir), refused(/more than the 16777216/));
    dir = await copy();
    await fs.writeFile(path.join(dir, "manifest.json"), "{not json");
    await assert.rejects(load(dir), refused(/not valid JSON/));
    dir = await copy();
    await editManifest(dir, (m) => {
      m.format_version = 3;
    });
    await assert.rejects(load(dir), refused(/format version 3 is newer than this runtime reads/));
    const v1 = path.join(REPO, "tests/golden/digits_v1");
    await assert.rejects(load(v1), refused(/no onnx target \(it has \["xla"\]\)/));
  });
  test("a directory that is no artifact", async () => {
    await assert.rejects(load(tmp), refused(/is not an artifact: it has no manifest.json/));
  });
  test("a label that is not printable", async () => {
    const dir = await copy();
    const text = "0\n1\n2\n3\n4\n5\n6\n7\n8\n\u001b[31m9\n";
    await fs.writeFile(path.join(dir, "labels.txt"), text);
    const { createHash } = await import("node:crypto");
    await editManifest(dir, (m) => {
      m.files["labels.txt"] = {
        sha256: createHash("sha256").update(text).digest("hex"),
        bytes: Buffer.byteLength(text),
      };
    });
    await assert.rejects(load(dir), refused(/labels.txt: line 10 is not a label/));
  });
});
