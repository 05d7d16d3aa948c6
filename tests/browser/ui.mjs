// Drives `haic-pipe ui` in a headless Chromium as a researcher would.
//   node ui.mjs live URL RUN N   watch run RUN's stage `slow` from running
//                                to succeeded while its curve grows to N
//   node ui.mjs compare URL A B  tick runs A and B on the runs page,
//                                compare them, sort, read the table
//   node ui.mjs steps URL RUN    move run RUN's step slider to the first
//                                validation and back
//   node ui.mjs shots URL A B    the README's screenshots (docs/regenerate.sh):
//                                the runs page with A and B ticked, run A's
//                                page, A and B compared
// Prints one JSON object of what it saw. HAIC_UI_SCREENSHOTS=DIR saves
// the pages it visits there.
import { chromium } from "playwright-core";

const [mode, url, ...runs] = process.argv.slice(2);
const shots = process.env.HAIC_UI_SCREENSHOTS;
const browser = await chromium.launch({
  executablePath: process.env.HAIC_CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const shot = async (page, name) => {
  if (shots) await page.screenshot({ path: `${shots}/${name}.png` });
};
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("pageerror", (e) => { console.error("page error:", e.message); process.exitCode = 1; });
  if (mode === "live") {
    await page.goto(`${url}runs/${runs[0]}`);
    const row = 'tr[data-stage="slow"]';
    await page.waitForSelector(`${row}[data-status="running"]`, { timeout: 30000 });
    await page.waitForFunction(() => Number(document.querySelector(".chart").dataset.points || 0) > 0,
      null, { timeout: 30000 });
    const first = Number(await page.getAttribute(".chart", "data-points"));
    // Each metric's value is the time the command printed it: how long
    // until the page shows it, for every point seen arrive.
    const seen = new Set();
    const latencies = [];
    let points = first;
    let status = "running";
    const deadline = Date.now() + 60000;
    while (Date.now() < deadline) {
      const newest = JSON.parse((await page.getAttribute(".chart", "data-newest")) || "[]");
      const now = Date.now() / 1000;
      for (const v of newest) {
        if (!seen.has(v)) { seen.add(v); latencies.push(now - v); }
      }
      points = Number(await page.getAttribute(".chart", "data-points"));
      status = await page.getAttribute(row, "data-status");
      if (status === "succeeded") break;
      await page.waitForTimeout(50);
    }
    // The stage's row may show it done a moment before the curve has its
    // last points (the chart reloads after the page's live parts).
    await page.waitForFunction((n) => Number(document.querySelector(".chart").dataset.points) >= n,
      Number(runs[1]), { timeout: 10000 });
    points = Number(await page.getAttribute(".chart", "data-points"));
    // Latencies of the points already there when the page opened say
    // nothing of the page: keep those that arrived after.
    const node = await page.getAttribute('.node[data-stage="slow"]', "data-status");
    await shot(page, "run");
    console.log(JSON.stringify({ first, points, status, node, latencies: latencies.slice(first) }));
  } else if (mode === "compare") {
    await page.goto(url);
    await page.waitForSelector("table.runs");
    for (const r of runs) await page.check(`input.pick[value="${r}"]`);
    await shot(page, "runs");
    await page.click("#compare-selected");
    await page.waitForSelector("#comparison table");
    await page.waitForFunction(() => Number(document.querySelector(".chart").dataset.points || 0) > 0);
    // Sort by the first column, twice: descending the second time.
    const head = "#comparison table tr:first-child th:first-child";
    await page.click(head);
    await page.click(head);
    const table = await page.$$eval("#comparison table tr", (trs) =>
      trs.map((tr) => [...tr.children].map((c) => c.textContent.trim())));
    const csv = await page.getAttribute("#csv", "href");
    const curves = Number(await page.getAttribute(".chart", "data-points"));
    await shot(page, "compare");
    console.log(JSON.stringify({ url: page.url(), table, csv, curves }));
  } else if (mode === "steps") {
    await page.goto(`${url}runs/${runs[0]}`);
    const fig = "figure.stepped";
    await page.waitForSelector(fig);
    const frames = JSON.parse(await page.getAttribute(fig, "data-frames"));
    const loaded = () => page.waitForFunction(
      (sel) => { const img = document.querySelector(`${sel} img`); return img.complete && img.naturalWidth > 0; }, fig);
    const seen = [];
    for (const i of [0, frames.length - 1]) {
      await page.$eval(`${fig} input.step`, (el, v) => {
        el.value = String(v);
        el.dispatchEvent(new Event("input", { bubbles: true }));
      }, i);
      await loaded();
      seen.push({
        src: await page.getAttribute(`${fig} img`, "src"),
        step: await page.textContent(`${fig} .at`),
      });
    }
    await shot(page, "steps");
    console.log(JSON.stringify({ frames, seen }));
  } else if (mode === "shots") {
    const [a, b] = runs;
    await page.goto(url);
    for (const r of [a, b]) await page.check(`input.pick[value="${r}"]`);
    await shot(page, "ui-runs");
    await page.setViewportSize({ width: 1280, height: 1300 });
    await page.goto(`${url}runs/${a}`);
    await page.waitForFunction(() => Number(document.querySelector(".chart").dataset.points || 0) > 0);
    await shot(page, "ui-run");
    await page.setViewportSize({ width: 1280, height: 900 });
    await page.goto(`${url}compare?runs=${a},${b}`);
    await page.waitForFunction(() => Number(document.querySelector(".chart").dataset.points || 0) > 0);
    await shot(page, "ui-compare");
    console.log(JSON.stringify({ shots: ["ui-runs", "ui-run", "ui-compare"] }));
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
} finally {
  await browser.close();
}
