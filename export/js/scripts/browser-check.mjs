// Drive the demo page (examples/browser) in headless Chromium with playwright-core:
// wait for the artifact to load, draw each digit as pixels, read the prediction the
// page shows, time batch-1 calls, save a screenshot. Prints one JSON object.
//
//   node scripts/browser-check.mjs --url http://127.0.0.1:PORT/ --digits digits.json \
//     --screenshot out.png [--chromium /usr/bin/chromium] [--calls 200]

import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import { chromium } from "playwright-core";

const { values: args } = parseArgs({
  options: {
    url: { type: "string" },
    digits: { type: "string" },
    screenshot: { type: "string" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
    calls: { type: "string", default: "200" },
  },
});
const digits = JSON.parse(readFileSync(args.digits, "utf-8"));

const launched = performance.now();
const browser = await chromium.launch({
  executablePath: args.chromium,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu"],
});
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 520 } });
  const console_ = [];
  page.on("console", (m) => console_.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => console_.push(`pageerror: ${e.message}`));
  const navigated = performance.now();
  await page.goto(args.url);
  await page.waitForFunction(() => window.jaxmintDemo && window.jaxmintDemo.state !== "loading", null, {
    timeout: 60_000,
  });
  const ready = performance.now();
  const state = await page.evaluate(() => ({
    state: window.jaxmintDemo.state,
    error: window.jaxmintDemo.error,
    loadMs: window.jaxmintDemo.loadMs,
  }));
  if (state.state !== "ready") {
    console.log(JSON.stringify({ ...state, console: console_ }));
    process.exit(1);
  }
  const results = [];
  for (const pixels of digits) {
    const result = await page.evaluate((p) => {
      window.jaxmintDemo.clear();
      window.jaxmintDemo.drawPixels(p);
      return window.jaxmintDemo.predict();
    }, pixels);
    result.shown = (await page.textContent("#prediction")).trim();
    results.push(result);
  }
  const meanMs = await page.evaluate((n) => window.jaxmintDemo.bench(n), Number(args.calls));
  await page.evaluate((p) => {
    window.jaxmintDemo.clear();
    window.jaxmintDemo.drawPixels(p);
    return window.jaxmintDemo.predict();
  }, digits[0]);
  if (args.screenshot) await page.screenshot({ path: args.screenshot });
  console.log(
    JSON.stringify({
      state: state.state,
      status: (await page.textContent("#status")).trim(),
      loadMs: state.loadMs, // in the page: script start to a checked, loaded model
      pageReadyMs: ready - navigated, // navigation to ready, as the driver saw it
      browserLaunchMs: navigated - launched,
      batch1MeanMs: meanMs,
      results,
      console: console_,
    }),
  );
} finally {
  await browser.close();
}
