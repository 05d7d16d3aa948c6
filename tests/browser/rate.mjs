// Rates `count` pairs on the rating page of `haic-pipe eval serve` in a
// headless Chromium, as a person would: clicks (and one arrow key), waiting
// for the page to confirm each answer. Prints the answers as JSON lines
// {"task_id", "choice"}. Usage: node rate.mjs URL RATER COUNT
import { chromium } from "playwright-core";

const [url, rater, count] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.HAIC_CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => { console.error("page error:", e.message); process.exitCode = 1; });
  await page.goto(`${url}?rater=${encodeURIComponent(rater)}`);
  for (let i = 0; i < Number(count); i++) {
    await page.waitForSelector("#pair:not([hidden])");
    const task = await page.getAttribute("#pair", "data-task");
    const before = Number(await page.getAttribute("#progress", "data-answered"));
    // Both images must have loaded (served by the package).
    await page.waitForFunction(() =>
      [...document.querySelectorAll("#pair img")].every((img) => img.complete && img.naturalWidth > 0));
    const choice = i % 2 === 0 ? "left" : "right";
    if (i === 1) {
      await page.keyboard.press("ArrowRight");
    } else {
      await page.click(`#${choice}`);
    }
    await page.waitForFunction(
      (n) => Number(document.querySelector("#progress").dataset.answered) === n, before + 1);
    console.log(JSON.stringify({ task_id: task, choice }));
  }
} finally {
  await browser.close();
}
