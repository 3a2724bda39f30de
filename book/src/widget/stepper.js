// The step-through: the CPU FlashAttention-2 (crates/attn-widget, compiled to WebAssembly by
// book/build.sh) runs the problem the reader picks; this script draws its trace one step at
// a time — the tile grid, the step's scores, and m_i, ℓ_i, Õ_i of the step's rows.
//
// Every number shown is the stage's own (the trace), except S_ij and O_ref, which come from
// the float64 reference. The browser test (book/test/stepper.mjs) reads the numbers through
// the data-field / data-row attributes and compares them with `attn trace`.

const PRESETS = {
  causal: { label: "causal, 8 × 8, blocks of 2", nq: 8, nk: 8, d: 4, br: 2, bc: 2, causal: true },
  full: { label: "no mask, 8 × 8, blocks of 4 × 2", nq: 8, nk: 8, d: 4, br: 4, bc: 2 },
  window: {
    label: "sliding window (5, 0), 16 × 16, blocks of 4",
    nq: 16, nk: 16, d: 4, br: 4, bc: 4, left: 5, right: 0,
  },
  cross: {
    label: "cross attention, causal, n_q = 6, n_k = 10",
    nq: 6, nk: 10, d: 3, br: 3, bc: 4, causal: true,
  },
  softcap: {
    label: "causal with softcap 2, 8 × 8",
    nq: 8, nk: 8, d: 4, br: 4, bc: 2, causal: true, softcap: 2,
  },
  online: { label: "the online softmax: one query row, keys two at a time", nq: 1, nk: 8, d: 2, br: 1, bc: 2 },
};

const FIELDS = [
  ["nq", "n_q", "query rows"],
  ["nk", "n_k", "keys"],
  ["d", "d", "head dimension"],
  ["br", "B_r", "query rows per block"],
  ["bc", "B_c", "keys per block"],
  ["left", "window left", "blank: no window; −1: unbounded"],
  ["right", "window right", "blank: no window; −1: unbounded"],
  ["softcap", "softcap c", "blank: none"],
  ["seed", "seed", "Q from seed, K and V from seed + 1, + 2"],
];

/** A number as the tables show it: five significant digits, −∞ spelled out. */
export function show(x) {
  if (x === -Infinity) return "−∞";
  if (x === Infinity) return "∞";
  if (Number.isNaN(x)) return "NaN";
  return Number(x.toPrecision(5)).toString().replace("-", "−");
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function cell(text, field, row, col) {
  const td = el("td", {}, text);
  if (field) td.dataset.field = field;
  if (row !== undefined) td.dataset.row = row;
  if (col !== undefined) td.dataset.col = col;
  return td;
}

class Stepper {
  constructor(root, Run) {
    this.root = root;
    this.Run = Run;
    this.run = null;
    this.step = 0;
    this.build();
    this.load(PRESETS.causal);
    this.start();
  }

  build() {
    const presets = el("select", { name: "preset", "aria-label": "problem" });
    for (const [key, p] of Object.entries(PRESETS)) presets.append(el("option", { value: key }, p.label));
    presets.addEventListener("change", () => {
      this.load(PRESETS[presets.value]);
      this.start();
    });
    const form = el("form", { class: "stepper-setup" }, el("label", {}, "problem ", presets));
    this.inputs = {};
    for (const [key, label, title] of FIELDS) {
      const input = el("input", { name: key, type: "text", inputmode: "decimal", size: "4", title });
      this.inputs[key] = input;
      form.append(el("label", {}, `${label} `, input));
    }
    this.inputs.causal = el("input", { name: "causal", type: "checkbox" });
    form.append(el("label", {}, this.inputs.causal, " causal"));
    form.append(el("button", { type: "submit", name: "run" }, "Run"));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.start();
    });

    const button = (name, text, title, go) => {
      const b = el("button", { type: "button", name, title }, text);
      b.addEventListener("click", () => this.go(go()));
      return b;
    };
    this.position = el("span", { class: "stepper-position", "aria-live": "polite" });
    const controls = el(
      "div",
      { class: "stepper-controls" },
      button("first", "« first", "first step", () => 0),
      button("back", "◀ back", "previous step (←)", () => this.step - 1),
      this.position,
      button("next", "next ▶", "next step (→)", () => this.step + 1),
      button("last", "last »", "last step", () => this.run.steps() - 1),
    );
    this.error = el("p", { class: "stepper-error", role: "alert" });
    this.caption = el("p", { class: "stepper-caption" });
    this.grid = svgEl("svg", { class: "stepper-grid", role: "img" });
    this.scores = el("table", { class: "stepper-scores" });
    this.state = el("table", { class: "stepper-state" });
    this.check = el("p", { class: "stepper-check" });
    const figure = el(
      "div",
      { class: "stepper-body" },
      el("div", { class: "stepper-left" }, this.grid, this.legend()),
      el("div", { class: "stepper-right" }, this.scores, this.state),
    );
    this.root.replaceChildren(form, this.error, controls, this.caption, figure, this.check);
    this.root.tabIndex = 0;
    this.root.addEventListener("keydown", (e) => {
      if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT" || !this.run) return;
      if (e.key === "ArrowRight") this.go(this.step + 1);
      else if (e.key === "ArrowLeft") this.go(this.step - 1);
      else return;
      e.preventDefault();
    });
  }

  legend() {
    const item = (cls, text) => el("span", { class: `stepper-key ${cls}` }, text);
    return el(
      "p",
      { class: "stepper-legend" },
      item("full", "full"),
      item("cut", "cut (masked in part)"),
      item("skipped", "never visited"),
      item("future", "not yet"),
    );
  }

  load(p) {
    const v = { left: "", right: "", softcap: "", seed: 0, causal: false, ...p };
    for (const [key] of FIELDS) this.inputs[key].value = v[key] ?? "";
    this.inputs.causal.checked = v.causal;
  }

  /** Runs the stage on the form's problem and shows its first step. */
  start() {
    const read = (key, optional) => {
      const text = this.inputs[key].value.trim();
      if (text === "" && optional) return undefined;
      const x = Number(text);
      if (text === "" || !Number.isFinite(x)) throw new Error(`${key}: '${text}' is not a number`);
      return x;
    };
    const integer = (key, optional) => {
      const x = read(key, optional);
      if (x !== undefined && !Number.isInteger(x)) throw new Error(`${key}: '${x}' is not a whole number`);
      if (x !== undefined && x < 0 && key !== "left" && key !== "right") {
        throw new Error(`${key}: '${x}' is negative`);
      }
      return x;
    };
    let run;
    try {
      run = new this.Run(
        integer("nq"), integer("nk"), integer("d"), integer("br"), integer("bc"),
        this.inputs.causal.checked, integer("left", true), integer("right", true),
        read("softcap", true), integer("seed"),
      );
    } catch (e) {
      this.error.textContent = e.message;
      return;
    }
    this.error.textContent = "";
    this.run?.free();
    this.run = run;
    const [tr, tc, br, bc] = run.grid();
    this.dims = { tr, tc, br, bc, d: run.head_dim() };
    this.fates = run.fates();
    this.output = run.output();
    this.reference = run.reference();
    this.go(0);
  }

  go(step) {
    this.step = Math.max(0, Math.min(step, this.run.steps() - 1));
    this.draw();
  }

  draw() {
    const run = this.run;
    const s = this.step;
    const kind = run.kind(s);
    const [i0, rows, j0, cols] = run.tile(s);
    const { br, bc } = this.dims;
    this.position.textContent = `step ${s + 1} of ${run.steps()}`;
    this.root.dataset.step = s;
    this.root.dataset.kind = kind;
    const qi = i0 / br + 1;
    const kj = j0 / bc + 1;
    if (kind === "finish") {
      this.caption.textContent =
        `Finish Q${qi} (rows ${i0 + 1}–${i0 + rows}): O_i = Õ_i / ℓ_i, and L_i = m_i + log ℓ_i is saved for the backward.`;
    } else {
      const why = kind === "cut"
        ? "cut: causal masking or the window removes some of its scores (−∞ below)"
        : "full: every row sees every key of the tile";
      this.caption.textContent =
        `Tile (Q${qi}, K${kj}): rows ${i0 + 1}–${i0 + rows} meet keys ${j0 + 1}–${j0 + cols}; ${why}.`;
    }
    this.drawGrid(kind, i0 / br, j0 / bc);
    this.drawScores(kind, i0, rows, j0, cols);
    this.drawState(kind, i0, rows);
    const last = s === run.steps() - 1;
    this.check.textContent = last
      ? `Done: ‖O − O_ref‖₂ / ‖O_ref‖₂ = ${run.error().toExponential(2)} against the float64 reference.`
      : "";
  }

  drawGrid(kind, qb, kb) {
    const { tr, tc } = this.dims;
    const size = Math.max(8, Math.min(36, Math.floor(360 / Math.max(tr, tc))));
    const pad = 28;
    const g = this.grid;
    g.replaceChildren();
    g.setAttribute("width", pad + tc * size + 2);
    g.setAttribute("height", pad + tr * size + 2);
    g.setAttribute("aria-label", `tile grid, ${tr} query blocks by ${tc} key blocks`);
    const seen = new Map();
    const visited = this.run.visited(this.step);
    for (let n = 0; n < visited.length; n += 2) seen.set(`${visited[n]},${visited[n + 1]}`, n / 2 + 1);
    for (let i = 0; i < tr; i++) {
      for (let j = 0; j < tc; j++) {
        const fate = ["skipped", "full", "cut"][this.fates[i * tc + j]];
        const order = seen.get(`${i},${j}`);
        const state = fate === "skipped" ? "skipped" : order ? fate : "future";
        const rect = svgEl("rect", {
          x: pad + j * size, y: pad + i * size, width: size, height: size,
          class: `tile ${state}${fate === "cut" ? " cut-tile" : ""}`,
        });
        rect.dataset.tile = `${i},${j}`;
        rect.dataset.state = state;
        g.append(rect);
        if (order && size >= 18) {
          const t = svgEl("text", { x: pad + (j + 0.5) * size, y: pad + (i + 0.5) * size, class: "order" });
          t.textContent = order;
          g.append(t);
        }
      }
    }
    if (size >= 18) {
      for (let i = 0; i < tr; i++) {
        const t = svgEl("text", { x: pad - 4, y: pad + (i + 0.5) * size, class: "label row-label" });
        t.textContent = `Q${i + 1}`;
        g.append(t);
      }
      for (let j = 0; j < tc; j++) {
        const t = svgEl("text", { x: pad + (j + 0.5) * size, y: pad - 8, class: "label" });
        t.textContent = `K${j + 1}`;
        g.append(t);
      }
    }
    // the current step: its tile, or at a finish the whole query block row
    const current = kind === "finish"
      ? { x: pad, y: pad + qb * size, width: tc * size, height: size }
      : { x: pad + kb * size, y: pad + qb * size, width: size, height: size };
    g.append(svgEl("rect", { ...current, class: "current" }));
  }

  drawScores(kind, i0, rows, j0, cols) {
    const t = this.scores;
    t.replaceChildren();
    if (kind === "finish") return;
    const s = this.run.scores(this.step);
    t.append(el("caption", {}, "S_ij of this tile (scaled, with the modifiers)"));
    const head = el("tr", {}, el("th", {}, ""));
    for (let c = 0; c < cols; c++) head.append(el("th", {}, `k${j0 + c + 1}`));
    t.append(head);
    for (let r = 0; r < rows; r++) {
      const tr = el("tr", {}, el("th", {}, `q${i0 + r + 1}`));
      for (let c = 0; c < cols; c++) tr.append(cell(show(s[r * cols + c]), "score", i0 + r, j0 + c));
      t.append(tr);
    }
  }

  /** m_i before this step, for the rescale factor e^(m_old − m_i): the block's previous step. */
  previousM(i0) {
    for (let n = this.step - 1; n >= 0; n--) {
      if (this.run.tile(n)[0] === i0) return this.run.kind(n) === "finish" ? null : this.run.m(n);
    }
    return null;
  }

  drawState(kind, i0, rows) {
    const run = this.run;
    const { d } = this.dims;
    const m = run.m(this.step);
    const ell = run.ell(this.step);
    const acc = run.acc(this.step);
    const finish = kind === "finish";
    const mOld = finish ? null : this.previousM(i0);
    const t = this.state;
    t.replaceChildren();
    t.append(el("caption", {}, finish ? "after the finish" : "the running statistics after this step"));
    const head = el("tr", {}, el("th", {}, "row"), el("th", {}, "m_i"));
    if (!finish) head.append(el("th", { title: "how much the old Õ_i and ℓ_i shrink" }, "e^(m_old − m_i)"));
    head.append(el("th", {}, "ℓ_i"));
    for (let c = 0; c < d; c++) head.append(el("th", {}, `${finish ? "O" : "Õ"}_i[${c}]`));
    if (finish) for (let c = 0; c < d; c++) head.append(el("th", { class: "ref" }, `O_ref[${c}]`));
    t.append(head);
    for (let r = 0; r < rows; r++) {
      const i = i0 + r;
      const tr = el("tr", {}, el("th", {}, `${i + 1}`), cell(show(m[r]), "m", i));
      if (!finish) {
        const old = mOld ? mOld[r] : -Infinity;
        const alpha = old === -Infinity ? "—" : show(Math.exp(old - m[r]));
        tr.append(cell(alpha, "alpha", i));
      }
      tr.append(cell(show(ell[r]), "ell", i));
      for (let c = 0; c < d; c++) tr.append(cell(show(acc[r * d + c]), "acc", i, c));
      if (finish) {
        for (let c = 0; c < d; c++) {
          const td = cell(show(this.reference[i * d + c]), "ref", i, c);
          td.classList.add("ref");
          tr.append(td);
        }
      }
      t.append(tr);
    }
  }
}

/** Mounts the step-through on every `.attn-stepper` of the page. */
async function mount() {
  const roots = document.querySelectorAll(".attn-stepper");
  if (roots.length === 0) return;
  let module;
  try {
    module = await import("./pkg/attn_widget.js");
    await module.default();
  } catch (e) {
    for (const root of roots) {
      root.textContent =
        "The step-through's WebAssembly is not in this build of the book: build the book with " +
        `\`bash book/build.sh\`, which compiles it (${e.message}).`;
    }
    return;
  }
  for (const root of roots) {
    root.stepper = new Stepper(root, module.Run);
    root.dataset.ready = "true";
  }
}

mount();
