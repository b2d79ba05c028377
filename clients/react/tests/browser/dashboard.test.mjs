// The whole path in a real browser: the built dashboard (served by `vite preview`, which
// proxies /api and /ws to a real tickguard), Debian's Chromium driven by playwright-core, and
// the simulator moving the price through a stop. Run with `npm run test:browser` (it builds
// first). Nothing here downloads a browser: CHROMIUM (default /usr/bin/chromium) must exist.

import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { chromium } from "playwright-core";
import { preview } from "vite";
import { artifactsDir, clientRoot, freePort, startStack } from "../support/servers.mjs";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

let stack;
let server;
let context;
let profileDir;

before(async () => {
  assert.ok(existsSync(join(clientRoot, "demo/dist/index.html")), "build the demo first (npm run build)");
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install -y chromium`);
  // The page's origin is vite preview's, and its proxy keeps the browser's Origin on /ws:
  // tickguard accepts the WebSocket only from an origin in CORS_ORIGIN (or its own).
  const port = await freePort();
  stack = await startStack({ label: "browser", corsOrigin: `http://127.0.0.1:${port}` });
  // vite.config.ts reads TICKGUARD_URL for its proxy when the config is loaded.
  process.env.TICKGUARD_URL = stack.apiBaseUrl;
  server = await preview({
    configFile: join(clientRoot, "vite.config.ts"),
    logLevel: "warn",
    preview: { host: "127.0.0.1", port, strictPort: true },
  });
  profileDir = mkdtempSync(join(tmpdir(), "tickguard-chromium-"));
  context = await chromium.launchPersistentContext(profileDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1100, height: 900 },
  });
});

after(async () => {
  await context?.close();
  if (profileDir) rmSync(profileDir, { recursive: true, force: true });
  await server?.close();
  await stack?.stop();
});

test("a long position with a stop moves to the closed table when the price crosses the stop", { timeout: 90_000 }, async () => {
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (error) => problems.push(String(error)));
  const base = server.resolvedUrls.local[0];
  await page.goto(`${base}?feed=${encodeURIComponent(stack.simUrl)}`);

  // Pick a user, wait for the live channel and a live BTC price.
  const userId = `browser-${Date.now()}`;
  await page.getByLabel("User id").fill(userId);
  await page.getByRole("button", { name: "Use" }).click();
  await page.locator('[data-testid="backend-state"][data-state="open"]').waitFor();
  await page.locator('[data-testid="feed-state"][data-state="live"]').waitFor();
  const btc = page.getByTestId("price-BTC-USD").locator("strong");
  await page.waitForFunction((el) => /^\d/.test(el.textContent ?? ""), await btc.elementHandle());
  const market = Number(await btc.textContent());
  assert.ok(market > 60_000 && market < 70_000, `BTC price ${market}`);

  // Open a long at the market with a stop 1000 below it (the walk moves cents per tick).
  await page.getByLabel("Symbol").selectOption("BTC-USD");
  await page.getByLabel("Side").selectOption("long");
  await page.getByLabel("Stop loss").fill("64000");
  await page.getByLabel("Take profit").fill("70000");
  await page.getByRole("button", { name: "Open long" }).click();
  const openRows = page.locator('[data-testid="open-positions"] tbody tr[data-position-id]');
  await openRows.first().waitFor();
  assert.equal(await openRows.count(), 1);
  const positionId = await openRows.first().getAttribute("data-position-id");
  assert.match(await openRows.first().innerText(), /BTC-USD\s+long/);

  // The simulator trades through the stop: the engine closes it and the event moves the row.
  await stack.publish("BTC-USD", "63000");
  const closedRow = page.locator(`[data-testid="closed-positions"] tr[data-position-id="${positionId}"]`);
  await closedRow.waitFor({ timeout: 15_000 });
  assert.equal(await closedRow.locator("td.reason").innerText(), "stop_loss");
  assert.match(await closedRow.innerText(), /64000/); // closed at its stop level
  await openRows.first().waitFor({ state: "detached" });
  assert.equal(await page.locator('[data-testid="open-positions"] tbody tr[data-position-id]').count(), 0);

  mkdirSync(artifactsDir, { recursive: true });
  await page.screenshot({ path: join(artifactsDir, "dashboard-closed.png"), fullPage: true });
  assert.deepEqual(problems, []);
});

test("the close button closes a position at the feed's price and rejects nothing silently", { timeout: 60_000 }, async () => {
  const page = await context.newPage();
  const base = server.resolvedUrls.local[0];
  const userId = `browser-close-${Date.now()}`;
  await page.goto(`${base}?feed=${encodeURIComponent(stack.simUrl)}&user=${userId}`);
  await page.locator('[data-testid="backend-state"][data-state="open"]').waitFor();

  // A bracket the server refuses shows its sentence.
  await page.getByLabel("Symbol").selectOption("ETH-USD");
  await page.getByLabel("Side").selectOption("short");
  await page.getByLabel("Entry price").fill("3000");
  await page.getByLabel("Take profit").fill("3100");
  await page.getByRole("button", { name: "Open short" }).click();
  await page.getByText("For short positions, takeProfit must be below entryPrice.").waitFor();

  await page.getByLabel("Take profit").fill("1000");
  await page.getByLabel("Stop loss").fill("5000");
  await page.getByRole("button", { name: "Open short" }).click();
  const openRow = page.locator('[data-testid="open-positions"] tbody tr[data-position-id]');
  await openRow.first().waitFor();
  const positionId = await openRow.first().getAttribute("data-position-id");
  const closeButton = openRow.first().getByRole("button", { name: "Close" });
  await page.waitForFunction((button) => !button.disabled, await closeButton.elementHandle());
  await closeButton.click();
  const closedRow = page.locator(`[data-testid="closed-positions"] tr[data-position-id="${positionId}"]`);
  await closedRow.waitFor();
  assert.equal(await closedRow.locator("td.reason").innerText(), "manual");
  await openRow.first().waitFor({ state: "detached" });
});
