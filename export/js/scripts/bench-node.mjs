// Cold start and batch-1 latency of an artifact's ONNX target in Node.js, for
// benchmarks/js_runtimes.py. Prints one JSON object.
//
//   node scripts/bench-node.mjs ARTIFACT [CALLS]

const started = performance.now();
const { load } = await import("../src/node.js");
const imported = performance.now();
const [dir, calls = "2000"] = process.argv.slice(2);
const model = await load(dir);
const loaded = performance.now();
const spec = model.inputs[0];
const size = spec.shape.slice(1).reduce((a, b) => a * b, 1);
const x = { dims: [1, ...spec.shape.slice(1)], data: new Float32Array(size).fill(0.5) };
await model.run({ x });
const first = performance.now();
const times = [];
for (let i = 0; i < Number(calls); i++) {
  const t = performance.now();
  await model.run({ x });
  times.push(performance.now() - t);
}
times.sort((a, b) => a - b);
console.log(
  JSON.stringify({
    importMs: imported - started,
    loadMs: loaded - imported,
    coldMs: first - started, // import, check and load, first answer
    batch1Us: 1000 * times[Math.floor(times.length / 2)],
  }),
);
