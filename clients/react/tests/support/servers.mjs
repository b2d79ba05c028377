// Starts a real tickguard stack for the tests: `tickguard sim` (the Coinbase-protocol
// simulator) and `tickguard serve` wired to it, on free loopback ports, with a fresh database:
// a new database on TEST_DATABASE_URL's server when that is set (dropped at the end), else the
// embedded PostgreSQL in a temporary data directory. Used by vitest's globalSetup and by the
// browser test, so both test the same thing a developer runs.

import { spawn, spawnSync } from "node:child_process";
import { createWriteStream, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const clientRoot = resolve(here, "../..");
const repoRoot = resolve(clientRoot, "../..");
export const artifactsDir = join(clientRoot, "test-artifacts");

/** The tickguard executable: TICKGUARD_BIN, else the repository's virtualenv. */
function tickguardBin() {
  return process.env.TICKGUARD_BIN ?? join(repoRoot, ".venv", "bin", "tickguard");
}

/** A loopback port that was free a moment ago (the OS picks it). */
export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

function psql(url, sql) {
  const result = spawnSync("psql", [url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql], {
    encoding: "utf8",
  });
  if (result.error || result.status !== 0) {
    throw new Error(`psql failed (${sql}): ${result.error?.message ?? result.stderr}`);
  }
}

/** A fresh database: {env, drop()} for TEST_DATABASE_URL's server, or an embedded data dir. */
function freshDatabase(name) {
  const testUrl = process.env.TEST_DATABASE_URL;
  if (testUrl) {
    const url = new URL(testUrl);
    url.pathname = `/${name}`;
    psql(testUrl, `CREATE DATABASE ${name}`);
    return {
      env: { DATABASE_URL: url.toString() },
      drop: () => psql(testUrl, `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`),
    };
  }
  const dataDir = mkdtempSync(join(tmpdir(), "tickguard-react-"));
  return {
    env: { TICKGUARD_DATA_DIR: dataDir },
    drop: () => rmSync(dataDir, { recursive: true, force: true }),
  };
}

/** Spawns one tickguard command in its own process group, its output in test-artifacts/. */
function launch(label, args, env, cwd) {
  mkdirSync(artifactsDir, { recursive: true });
  const log = createWriteStream(join(artifactsDir, `${label}.log`));
  const child = spawn(tickguardBin(), args, {
    cwd,
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "pipe"],
    detached: true, // its own group, so stopping it also stops what it started
  });
  child.stdout.pipe(log);
  child.stderr.pipe(log);
  const exited = new Promise((done) => child.once("exit", (code, signal) => done({ code, signal })));
  // Its own group does not die with us: if this process exits without stop(), take it along.
  const orphanGuard = () => {
    try {
      process.kill(-child.pid, "SIGKILL");
    } catch {
      // already gone
    }
  };
  process.once("exit", orphanGuard);
  exited.then(() => process.off("exit", orphanGuard));
  return { label, child, exited };
}

/** Sends `signal` to the process group, then SIGKILL if it has not exited within `graceMs`. */
async function halt(proc, graceMs = 10_000) {
  if (proc.child.exitCode !== null || proc.child.signalCode !== null) return;
  try {
    process.kill(-proc.child.pid, "SIGTERM");
  } catch {
    return; // already gone
  }
  const timer = new Promise((done) => setTimeout(() => done("timeout"), graceMs));
  if ((await Promise.race([proc.exited, timer])) === "timeout") {
    try {
      process.kill(-proc.child.pid, "SIGKILL");
    } catch {
      // exited between the check and the kill
    }
    await proc.exited;
  }
}

/** Polls `check` until it returns true; fails after `timeoutMs` or when `proc` exits. */
async function waitFor(what, check, proc, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  let lastError = "";
  while (Date.now() < deadline) {
    if (proc.child.exitCode !== null) {
      throw new Error(`${proc.label} exited (${proc.child.exitCode}) before ${what}; see test-artifacts/${proc.label}.log`);
    }
    try {
      if (await check()) return;
    } catch (error) {
      lastError = String(error);
    }
    await new Promise((done) => setTimeout(done, 100));
  }
  throw new Error(`timed out waiting for ${what} (${lastError}); see test-artifacts/${proc.label}.log`);
}

/**
 * Starts sim + serve. Options: `products` ("BTC-USD=65000,ETH-USD=3000"), `path` ("walk" or
 * "script"), `corsOrigin`, `label` (log file prefix). Resolves with {apiBaseUrl, simUrl,
 * simControlUrl, publish(product, price), stop()} once the API answers and the feed is live for
 * every product.
 */
export async function startStack(options = {}) {
  const {
    products = "BTC-USD=65000,ETH-USD=3000",
    path = "walk",
    corsOrigin = "http://localhost:5173",
    label = "stack",
  } = options;
  const [simPort, apiPort] = [await freePort(), await freePort()];
  const productIds = products.split(",").map((entry) => entry.split("=")[0]);
  const database = freshDatabase(`tickguard_react_${process.pid}_${Date.now()}`);
  const cwd = mkdtempSync(join(tmpdir(), "tickguard-cwd-")); // no stray .env is read
  const procs = [];
  const stop = async () => {
    for (const proc of procs.reverse()) await halt(proc);
    database.drop();
    rmSync(cwd, { recursive: true, force: true });
  };
  try {
    const sim = launch(
      `${label}-sim`,
      ["sim", "--port", String(simPort), "--products", products, "--path", path],
      {},
      cwd,
    );
    procs.push(sim);
    const simControlUrl = `http://127.0.0.1:${simPort}/control`;
    await waitFor("the simulator", async () => (await fetch(`http://127.0.0.1:${simPort}/stats`)).ok, sim, 30_000);

    const serve = launch(
      `${label}-serve`,
      ["serve"],
      {
        ...database.env,
        HOST: "127.0.0.1",
        PORT: String(apiPort),
        COINBASE_WS_URL: `ws://127.0.0.1:${simPort}`,
        COINBASE_PRODUCTS: productIds.join(","),
        CORS_ORIGIN: corsOrigin,
        LOG_LEVEL: "info",
      },
      cwd,
    );
    procs.push(serve);
    const apiBaseUrl = `http://127.0.0.1:${apiPort}`;
    await waitFor(
      "tickguard to be ready with a live feed",
      async () => {
        const response = await fetch(`${apiBaseUrl}/ready`);
        if (!response.ok) return false;
        const body = await response.json();
        return productIds.every((id) => body.feed?.products?.[id]?.state === "live");
      },
      serve,
      90_000,
    );

    /** Makes the simulator trade `product` at `price` now (one ticker). */
    const publish = async (product, price) => {
      const response = await fetch(simControlUrl, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ op: "publish", product, price: String(price) }),
      });
      if (!response.ok) throw new Error(`sim publish: HTTP ${response.status} ${await response.text()}`);
    };
    return { apiBaseUrl, simUrl: `ws://127.0.0.1:${simPort}`, simControlUrl, publish, stop };
  } catch (error) {
    await stop();
    throw error;
  }
}
