// The book's browser test: serves the built book (book/build) on localhost, opens the
// step-through chapter in headless Chromium, and for several problems steps the widget
// forward through every step and back again, checking each number it shows — m_i, ℓ_i,
// Õ_i, the rescale factor, O_ref — against `attn trace` of the native build. Saves a
// screenshot. Fails on any request that leaves the page's own server.
//
//   node book/test/stepper.mjs [--attn target/release/attn] [--screenshot PATH]
//
// Chromium: /usr/bin/chromium (Debian's package) unless CHROMIUM says otherwise.

import { execFileSync } from "node:child_process";
import { createReadStream, existsSync, statSync } from "node:fs";
import { createServer } from "node:http";
import { dirname, extname, join, normalize, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "../..");
const args = process.argv.slice(2);
const flag = (name, fallback) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : fallback;
};
const attn = resolve(root, flag("--attn", "target/release/attn"));
const screenshot = resolve(root, flag("--screenshot", "target/book-test/stepper.png"));
const book = join(root, "book/build");

// The problems: the presets, then typed-in ones with odd sizes, partial blocks, n_q ≠ n_k
// and rows that see no key at all.
const CASES = [
  { preset: "causal", trace: "--seq-q 8 --head-dim 4 --q-block 2 --k-block 2 --causal" },
  { preset: "window", trace: "--seq-q 16 --head-dim 4 --q-block 4 --k-block 4 --window 5,0" },
  { preset: "cross", trace: "--seq-q 6 --seq-k 10 --head-dim 3 --q-block 3 --k-block 4 --causal" },
  { preset: "softcap", trace: "--seq-q 8 --head-dim 4 --q-block 4 --k-block 2 --causal --softcap 2" },
  { preset: "online", trace: "--seq-q 1 --seq-k 8 --head-dim 2 --q-block 1 --k-block 2" },
  {
    fields: { nq: 7, nk: 5, d: 3, br: 3, bc: 2, left: 2, right: 1, softcap: "", seed: 5 },
    causal: false,
    trace: "--seq-q 7 --seq-k 5 --head-dim 3 --q-block 3 --k-block 2 --window 2,1 --seed 5",
  },
  {
    // bottom-right causal with n_q > n_k: the first three rows see no key
    fields: { nq: 6, nk: 3, d: 5, br: 4, bc: 2, left: "", right: "", softcap: "", seed: 9 },
    causal: true,
    trace: "--seq-q 6 --seq-k 3 --head-dim 5 --q-block 4 --k-block 2 --causal --seed 9",
  },
];

const TYPES = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css",
  ".wasm": "application/wasm", ".svg": "image/svg+xml", ".woff2": "font/woff2", ".json": "application/json" };

function serve() {
  const server = createServer((req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname));
    let file = join(book, path);
    if (existsSync(file) && statSync(file).isDirectory()) file = join(file, "index.html");
    if (!file.startsWith(book) || !existsSync(file)) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream" });
    createReadStream(file).pipe(res);
  });
  return new Promise((ok) => server.listen(0, "127.0.0.1", () => ok(server)));
}

/** `attn trace` as rows: [{step, kind, row, m, ell, acc: [...]}]. */
function trace(flags) {
  const text = execFileSync(attn, ["trace", ...flags.split(" ")], { encoding: "utf8" });
  const [head, ...lines] = text.trim().split("\n");
  const cols = head.split(",");
  return lines.map((line) => {
    const v = line.split(",");
    const num = (i) => parseNumber(v[i]);
    return {
      step: Number(v[0]), kind: v[1], i0: Number(v[2]), row: Number(v[6]),
      m: num(7), ell: num(8), acc: cols.slice(9).map((_, c) => num(9 + c)),
    };
  });
}

function parseNumber(text) {
  const t = text.trim().replace(/−/g, "-");
  if (t === "-∞" || t === "-inf") return -Infinity;
  if (t === "∞" || t === "inf") return Infinity;
  return Number(t);
}

let failures = 0;
function check(ok, message) {
  if (!ok) {
    failures++;
    console.error(`FAIL ${message}`);
  }
}

function close(shown, want, what) {
  const x = parseNumber(shown);
  const ok = x === want || Math.abs(x - want) <= 1e-4 * Math.abs(want) + 1e-7;
  check(ok, `${what}: the widget shows ${shown}, attn trace gives ${want}`);
}

/** What the widget shows now: its step, kind and the state table's cells. */
async function shown(page) {
  return page.$eval(".attn-stepper", (w) => ({
    step: Number(w.dataset.step),
    kind: w.dataset.kind,
    position: w.querySelector(".stepper-position").textContent,
    cells: [...w.querySelectorAll(".stepper-state td")].map((td) => ({
      field: td.dataset.field, row: Number(td.dataset.row), col: Number(td.dataset.col), text: td.textContent,
    })),
    check: w.querySelector(".stepper-check").textContent,
    error: w.querySelector(".stepper-error").textContent,
  }));
}

function compare(view, want, name) {
  const rows = want.filter((r) => r.step === view.step);
  check(rows.length > 0 && rows[0].kind === view.kind, `${name} step ${view.step}: kind ${view.kind}, want ${rows[0]?.kind}`);
  const at = (field, row, col) => view.cells.find((c) => c.field === field && c.row === row && (col === undefined || c.col === col));
  for (const r of rows) {
    const where = `${name} step ${view.step} row ${r.row}`;
    for (const [field, want_] of [["m", r.m], ["ell", r.ell]]) {
      const c = at(field, r.row);
      check(c, `${where}: no ${field} cell`);
      if (c) close(c.text, want_, `${where} ${field}`);
    }
    r.acc.forEach((a, col) => {
      const c = at("acc", r.row, col);
      check(c, `${where}: no acc[${col}] cell`);
      if (c) close(c.text, a, `${where} acc[${col}]`);
    });
    if (r.kind === "finish") continue;
    // the rescale e^(m_old − m_i): m_old from the block's previous tile step
    const prev = want.filter((p) => p.step < r.step && p.row === r.row && p.kind !== "finish").at(-1);
    const alpha = at("alpha", r.row);
    if (!prev || prev.m === -Infinity) check(alpha?.text === "—", `${where}: rescale ${alpha?.text}, want —`);
    else close(alpha.text, Math.exp(prev.m - r.m), `${where} rescale`);
  }
  // O_ref beside O at a finish: the float64 reference, within float32 rounding
  for (const c of view.cells.filter((c) => c.field === "ref")) {
    const o = rows.find((r) => r.row === c.row).acc[c.col];
    check(Math.abs(parseNumber(c.text) - o) <= 1e-4 * Math.abs(o) + 1e-6, `${name} O_ref[${c.row}][${c.col}] ${c.text} vs O ${o}`);
  }
}

async function main() {
  const server = await serve();
  const origin = `http://127.0.0.1:${server.address().port}`;
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  page.on("request", (r) => check(r.url().startsWith(origin), `a request left the book: ${r.url()}`));
  page.on("pageerror", (e) => check(false, `page error: ${e.message}`));
  await page.goto(`${origin}/step-through.html`);
  await page.waitForSelector(".attn-stepper[data-ready=true]", { timeout: 20000 });

  let steps = 0;
  for (const c of CASES) {
    const name = c.preset ?? c.trace;
    if (c.preset) {
      await page.selectOption(".attn-stepper select[name=preset]", c.preset);
    } else {
      for (const [key, value] of Object.entries(c.fields)) await page.fill(`.attn-stepper input[name=${key}]`, String(value));
      await page.setChecked(".attn-stepper input[name=causal]", c.causal);
      await page.click(".attn-stepper button[name=run]");
    }
    const want = trace(c.trace);
    const total = Math.max(...want.map((r) => r.step)) + 1;
    let view = await shown(page);
    check(view.error === "", `${name}: error ${view.error}`);
    check(view.position === `step 1 of ${total}`, `${name}: '${view.position}', want 'step 1 of ${total}'`);
    for (let s = 0; s < total; s++) {
      if (s > 0) await page.click(".attn-stepper button[name=next]");
      view = await shown(page);
      check(view.step === s, `${name}: at step ${view.step}, want ${s}`);
      compare(view, want, name);
      steps++;
    }
    const err = Number(view.check.match(/= (\S+) against/)?.[1]);
    check(err < 1e-5, `${name}: last step says '${view.check}'`);
    // and back: each step shows what it showed on the way forward
    for (let s = total - 2; s >= Math.max(0, total - 4); s--) {
      await page.click(".attn-stepper button[name=back]");
      view = await shown(page);
      check(view.step === s, `${name}: back at step ${view.step}, want ${s}`);
      compare(view, want, `${name} (back)`);
    }
  }

  // bad input: a clear message, and the last good run stays on show
  await page.fill(".attn-stepper input[name=nk]", "65");
  await page.click(".attn-stepper button[name=run]");
  const bad = await shown(page);
  check(bad.error.startsWith("n_k is 65: the step-through takes 1 to 64"), `bad input says '${bad.error}'`);
  check(bad.cells.length > 0, "bad input cleared the last run");

  // the screenshot: the causal preset, a few steps in
  await page.selectOption(".attn-stepper select[name=preset]", "causal");
  for (let s = 0; s < 6; s++) await page.click(".attn-stepper button[name=next]");
  execFileSync("mkdir", ["-p", dirname(screenshot)]);
  await (await page.$(".attn-stepper")).screenshot({ path: screenshot });

  await browser.close();
  server.close();
  if (failures > 0) {
    console.error(`${failures} check(s) failed`);
    process.exit(1);
  }
  console.log(`step-through: ${CASES.length} problems, ${steps} steps checked against attn trace; screenshot ${screenshot}`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
