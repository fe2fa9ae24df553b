// Drives the supervisor dashboard in headless Chromium for tests/api/dashboard.rs.
//
// Environment: KEFU_URL (http://<tenant domain>:<port>), KEFU_EMAIL, KEFU_PASSWORD,
// KEFU_SCREENSHOT (where to keep the picture). Every tenant domain of the tests ends in
// `.test`, which Chromium is told to resolve to 127.0.0.1.
//
// Protocol with the Rust test on stdout: `READY` once the dashboard shows the tenant with
// nothing queued (the test then brings a visitor), `CHANGED` once the queued count went up.
import { chromium } from "playwright-core";

const { KEFU_URL, KEFU_EMAIL, KEFU_PASSWORD, KEFU_SCREENSHOT } = process.env;
// Long enough for a slow, shared CI machine; a failing run ends here rather than hanging.
const STEP_TIMEOUT_MS = 30_000;

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--host-resolver-rules=MAP *.test 127.0.0.1"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(STEP_TIMEOUT_MS);
  await page.goto(KEFU_URL + "/dashboard");
  await page.fill("#email", KEFU_EMAIL);
  await page.fill("#password", KEFU_PASSWORD);
  await page.click("#signin");
  await page.waitForSelector("#board:not([hidden])");
  await page.waitForFunction(() => document.getElementById("t-queued").textContent === "0");
  console.log("READY");
  await page.waitForFunction(() => document.getElementById("t-queued").textContent === "1");
  // Let the charts draw a second point before the picture.
  await page.waitForTimeout(2500);
  await page.screenshot({ path: KEFU_SCREENSHOT, fullPage: true });
  console.log("CHANGED");
} finally {
  await browser.close();
}
