import { defineConfig } from "vitest/config";

// Unit tests of the client and hooks, against a real tickguard (sim + serve) that
// tests/globalSetup.ts starts once for the run. The browser test is separate (tests/browser/).
export default defineConfig({
  test: {
    environment: "jsdom",
    include: ["tests/**/*.test.{ts,tsx}"],
    globalSetup: ["tests/globalSetup.ts"],
    setupFiles: ["tests/setup.ts"],
    testTimeout: 20_000,
    hookTimeout: 120_000,
  },
});
