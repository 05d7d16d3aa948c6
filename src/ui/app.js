// haic-pipe ui: keeps the page live, draws the curves (uPlot), remembers
// which runs are ticked, sorts tables. The server draws everything else.
(() => {
  "use strict";
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const selected = new Set();
  const charts = [];
  // The registry's version the page was drawn at.
  let version = Number(document.body.dataset.version);
  // Each live part's last HTML as fetched: a part is replaced only when
  // that changes (the browser's own serialisation never equals it), so an
  // unchanged part keeps its state (a step slider's position).
  const fetched = new Map();

  async function getJSON(url) {
    const r = await fetch(url);
    if (!r.ok) throw new Error(`${url}: ${r.status} ${await r.text()}`);
    return r.json();
  }

  // ---- live parts: fetched again when the registry's version moves ----
  async function refreshLive() {
    for (const el of document.querySelectorAll("[data-live]")) {
      const r = await fetch(el.dataset.live);
      if (!r.ok) continue;
      const html = await r.text();
      if (html !== fetched.get(el)) {
        fetched.set(el, html);
        el.innerHTML = html;
        restoreSelection();
      }
    }
    for (const c of charts) await c.reload();
  }

  async function poll() {
    const live = document.getElementById("live");
    try {
      const v = (await getJSON("/api/version")).version;
      if (v !== version) {
        version = v;
        await refreshLive();
      }
      live.textContent = "live";
      live.className = "";
    } catch (e) {
      live.textContent = "server gone";
      live.className = "off";
    }
    setTimeout(poll, 1000);
  }

  // ---- runs ticked for comparison ----
  function restoreSelection() {
    for (const box of document.querySelectorAll("input.pick")) box.checked = selected.has(box.value);
    const button = document.getElementById("compare-selected");
    if (button) button.disabled = selected.size < 2;
  }
  // A step image's slider: that step's frame.
  document.addEventListener("input", (e) => {
    if (!e.target.matches(".stepped input.step")) return;
    const fig = e.target.closest("figure");
    const frame = JSON.parse(fig.dataset.frames)[Number(e.target.value)];
    if (!frame) return;
    fig.querySelector("img").src = frame.src;
    fig.querySelector(".at").textContent = frame.step;
  });
  document.addEventListener("change", (e) => {
    if (!e.target.matches("input.pick")) return;
    if (e.target.checked) selected.add(e.target.value); else selected.delete(e.target.value);
    restoreSelection();
  });
  document.addEventListener("click", (e) => {
    if (e.target.id === "compare-selected") {
      location.href = "/compare?runs=" + [...selected].join(",");
    }
    const th = e.target.closest(".sortable th");
    if (th) sortBy(th);
  });

  // ---- sorting: a click on a column's head, again to reverse ----
  function sortBy(th) {
    const table = th.closest("table");
    const rows = [...table.querySelectorAll("tr")].filter((r) => !r.querySelector("th"));
    const col = [...th.parentNode.children].indexOf(th);
    const down = th.dataset.sorted !== "up";
    for (const h of th.parentNode.children) delete h.dataset.sorted;
    th.dataset.sorted = down ? "up" : "down";
    const cell = (r) => (r.children[col] ? r.children[col].textContent.trim() : "");
    const numeric = rows.every((r) => cell(r) === "" || !isNaN(parseFloat(cell(r))));
    rows.sort((a, b) => {
      const [x, y] = [cell(a), cell(b)];
      const c = numeric ? (parseFloat(x) || 0) - (parseFloat(y) || 0) : x.localeCompare(y);
      return down ? c : -c;
    });
    const body = rows.length ? rows[0].parentNode : null;
    for (const r of rows) body.appendChild(r);
  }

  // ---- curves ----
  // TensorBoard's smoothing: an exponential moving average, debiased.
  function smooth(y, a) {
    if (!a) return y;
    let last = 0;
    return y.map((v, i) => {
      last = last * a + (1 - a) * v;
      return last / (1 - Math.pow(a, i + 1));
    });
  }

  class Chart {
    constructor(el) {
      this.el = el;
      this.runs = el.dataset.runs;
      this.metric = el.querySelector(".metric");
      this.x = el.querySelector(".x");
      this.log = el.querySelector(".log");
      this.smooth = el.querySelector(".smooth");
      this.plot = el.querySelector(".plot");
      this.info = el.querySelector(".points");
      this.data = null;
      for (const c of [this.metric, this.x]) c.addEventListener("change", () => this.reload());
      for (const c of [this.log, this.smooth]) c.addEventListener("input", () => this.draw());
    }

    async names() {
      const names = await getJSON(`/api/metrics?runs=${this.runs}`);
      const have = [...this.metric.options].map((o) => o.value);
      if (names.join("\n") === have.join("\n")) return;
      const keep = this.metric.value;
      this.metric.innerHTML = "";
      for (const n of names) this.metric.add(new Option(n, n));
      const preferred = names.find((n) => n === keep) || names.find((n) => n.endsWith(":train.loss")) || names[0];
      if (preferred) this.metric.value = preferred;
    }

    async reload() {
      try {
        await this.names();
        if (!this.metric.value) {
          this.info.textContent = "no metrics yet";
          return;
        }
        const q = new URLSearchParams({ runs: this.runs, metric: this.metric.value, x: this.x.value, points: "2000" });
        this.data = await getJSON(`/api/series?${q}`);
        this.draw();
      } catch (e) {
        this.info.textContent = String(e);
      }
    }

    draw() {
      const d = this.data;
      if (!d) return;
      const total = d.series.reduce((n, s) => n + s.points, 0);
      const drawn = d.series.reduce((n, s) => n + s.x.length, 0);
      this.el.dataset.points = String(total);
      this.el.dataset.metric = d.metric;
      // The newest values drawn, for whoever checks the page (the tests).
      this.el.dataset.newest = JSON.stringify(d.series.length ? d.series[0].y.slice(-64) : []);
      this.info.textContent = `${total} points, ${drawn} drawn`;
      const series = d.series.filter((s) => s.x.length > 0);
      if (this.u) { this.u.destroy(); this.u = null; }
      if (!series.length) { this.plot.textContent = "no points yet"; return; }
      this.plot.textContent = "";
      const a = Number(this.smooth.value);
      const tables = series.map((s) => [s.x, smooth(s.y, a)]);
      const data = tables.length === 1 ? tables[0] : uPlot.join(tables);
      const positive = series.every((s) => s.y.every((v) => v > 0));
      const opts = {
        width: Math.max(320, this.plot.clientWidth || 800),
        height: 320,
        scales: { x: { time: false }, y: { distr: this.log.checked && positive ? 3 : 1 } },
        series: [{ label: d.x }, ...series.map((s, i) => ({
          label: s.label, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: true,
          points: { show: s.x.length < 50 },
        }))],
        axes: [{ label: d.x }, { label: d.metric }],
      };
      this.u = new uPlot(opts, data, this.plot);
    }
  }

  for (const el of document.querySelectorAll(".chart")) {
    const c = new Chart(el);
    charts.push(c);
    c.reload();
  }
  restoreSelection();
  poll();
})();
