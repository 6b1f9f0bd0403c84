// The demo page: draw on an 8x8 grid (the digits dataset's resolution), and the
// artifact's ONNX target, checked and run in the page by jaxmint-runtime-js with
// onnxruntime-web, says which digit it is.

import { loadUrl } from "/lib/browser.js";

const GRID = 8;
const pad = document.getElementById("pad");
const ctx = pad.getContext("2d", { willReadFrequently: true });
const cell = pad.width / GRID;
const status = document.getElementById("status");

function clear() {
  ctx.fillStyle = "black";
  ctx.fillRect(0, 0, pad.width, pad.height);
  document.getElementById("prediction").textContent = "·";
  document.getElementById("scores").replaceChildren();
}

/** The canvas as the model's input: each 8x8 cell's mean brightness in [0, 1]. */
function pixels() {
  const rgba = ctx.getImageData(0, 0, pad.width, pad.height).data;
  const x = new Float32Array(GRID * GRID);
  for (let py = 0; py < pad.height; py++) {
    for (let px = 0; px < pad.width; px++) {
      const i = Math.floor(py / cell) * GRID + Math.floor(px / cell);
      x[i] += rgba[(py * pad.width + px) * 4] / 255;
    }
  }
  return x.map((v) => v / (cell * cell));
}

/** Paint 64 values in [0, 1] as the grid's cells (what a test or a sample button draws). */
function drawPixels(values) {
  values.forEach((v, i) => {
    const level = Math.round(Math.min(1, Math.max(0, v)) * 255);
    ctx.fillStyle = `rgb(${level}, ${level}, ${level})`;
    ctx.fillRect((i % GRID) * cell, Math.floor(i / GRID) * cell, cell, cell);
  });
}

function show(result) {
  document.getElementById("prediction").textContent = result.label;
  const top = Math.max(...result.probabilities);
  document.getElementById("scores").replaceChildren(
    ...result.probabilities.map((p, k) => {
      const row = document.createElement("div");
      row.className = "bar";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = `${Math.round(120 * p)}px`;
      row.append(`${model.labels.output?.[k] ?? k} `, fill, ` ${(100 * p).toFixed(1)}%`);
      if (p === top) row.style.fontWeight = "bold";
      return row;
    }),
  );
}

async function predict() {
  const x = pixels();
  const start = performance.now();
  const { output } = await model.run({ x: { dims: [1, GRID * GRID], data: x } });
  const ms = performance.now() - start;
  const logits = Array.from(output.data);
  const peak = Math.max(...logits);
  const exps = logits.map((v) => Math.exp(v - peak));
  const total = exps.reduce((a, b) => a + b, 0);
  const index = logits.indexOf(peak);
  const result = {
    index,
    label: model.labels.output?.[index] ?? String(index),
    logits,
    probabilities: exps.map((e) => e / total),
    input: Array.from(x),
    ms,
  };
  show(result);
  return result;
}

/** Mean milliseconds per batch-1 run over `calls` runs (one timer around them all:
 * a page that is not cross-origin isolated reads the clock to 0.1 ms). */
async function bench(calls) {
  const x = { dims: [1, GRID * GRID], data: pixels() };
  await model.run({ x });
  const start = performance.now();
  for (let i = 0; i < calls; i++) await model.run({ x });
  return (performance.now() - start) / calls;
}

let drawing = false;
function stroke(event) {
  const r = pad.getBoundingClientRect();
  const x = ((event.clientX - r.left) / r.width) * pad.width;
  const y = ((event.clientY - r.top) / r.height) * pad.height;
  ctx.fillStyle = "white";
  ctx.beginPath();
  ctx.arc(x, y, cell * 0.6, 0, 2 * Math.PI);
  ctx.fill();
}
pad.addEventListener("pointerdown", (e) => {
  drawing = true;
  stroke(e);
});
pad.addEventListener("pointermove", (e) => drawing && stroke(e));
addEventListener("pointerup", () => {
  if (drawing) predict();
  drawing = false;
});
document.getElementById("clear").addEventListener("click", clear);

clear();
const demo = (window.jaxmintDemo = { state: "loading", drawPixels, predict, bench, clear });
const started = performance.now();
let model;
try {
  model = await loadUrl("/artifact/", { wasmPaths: "/ort/" });
  demo.loadMs = performance.now() - started;
  demo.state = "ready";
  status.textContent =
    `${model.name}: every file's sha256 checked, the check sample passed; ` +
    `loaded in ${demo.loadMs.toFixed(0)} ms with onnxruntime-web (WebAssembly). Draw a digit.`;
} catch (e) {
  demo.state = "error";
  demo.error = `${e.name}: ${e.message}`;
  status.textContent = demo.error;
  status.className = "error";
}
