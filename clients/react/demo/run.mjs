// `npm run demo`: the dashboard against the simulator in one command. Starts `tickguard sim`
// and `tickguard serve` (fresh database: a new one on TEST_DATABASE_URL's server if set, else
// the embedded PostgreSQL in a temporary directory; both are removed on exit), then Vite's dev
// server on DEMO_PORT (default 5173) proxying /api and /ws to tickguard. Ctrl-C stops it all.

import { createServer } from "vite";
import { clientRoot, startStack } from "../tests/support/servers.mjs";

const port = Number(process.env.DEMO_PORT ?? 5173);
// The page runs on Vite's origin and Vite's proxy keeps the browser's Origin on /ws: tickguard
// accepts a WebSocket only from CORS_ORIGIN (or its own origin), so Vite's origin is listed.
const corsOrigin = `http://127.0.0.1:${port},http://localhost:${port}`;
const stack = await startStack({ label: "demo", corsOrigin });
process.env.TICKGUARD_URL = stack.apiBaseUrl; // read by vite.config.ts's proxy
const vite = await createServer({
  configFile: `${clientRoot}/vite.config.ts`,
  server: { host: "127.0.0.1", port, strictPort: true },
});
await vite.listen();
const url = `http://127.0.0.1:${port}/?feed=${encodeURIComponent(stack.simUrl)}&user=demo`;
console.log(`tickguard API  ${stack.apiBaseUrl}`);
console.log(`simulator      ${stack.simUrl} (control: POST ${stack.simControlUrl})`);
console.log(`dashboard      ${url}`);
console.log(
  `move a price:  curl -X POST ${stack.simControlUrl} -d '{"op":"publish","product":"BTC-USD","price":"64000"}'`,
);

let stopping = false;
const stop = async () => {
  if (stopping) return;
  stopping = true;
  console.log("stopping…");
  await vite.close();
  await stack.stop();
  process.exit(0);
};
process.on("SIGINT", stop);
process.on("SIGTERM", stop);
