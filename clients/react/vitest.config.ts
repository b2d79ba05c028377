import { defineConfig } from "vitest/config";

// Unit tests of the client and hooks, against a real tickguard (sim + serve) that
// tests/globalSetup.ts starts once for the run. The browser test is separate (tests/browser/).
export default defineConfig({
  test: {
    environment: "jsdom",
    // The page's origin: the React dev server's, which CORS_ORIGIN allows (tickguard's /ws
    // refuses other Origins with 403; jsdom's default page is http://localhost:3000).
    environmentOptions: { jsdom: { url: "http://localhost:5173/" } },
    include: ["tests/**/*.test.{ts,tsx}"],
    globalSetup: ["tests/globalSetup.ts"],
    setupFiles: ["tests/setup.ts"],
    testTimeout: 20_000,
    hookTimeout: 120_000,
  },
});
