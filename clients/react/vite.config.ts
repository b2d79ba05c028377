import { fileURLToPath } from "node:url";
import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

// The demo dashboard (demo/). It talks to tickguard on its own origin by default
// (VITE_API_BASE_URL "/"): `tickguard serve` serves the built files itself, and `vite` /
// `vite preview` proxy /api and /ws to TICKGUARD_URL (default http://127.0.0.1:8080).
const backend = process.env.TICKGUARD_URL ?? "http://127.0.0.1:8080";
const proxy = {
  "/api": { target: backend, changeOrigin: true },
  "/health": { target: backend, changeOrigin: true },
  "/ws": { target: backend.replace(/^http/, "ws"), ws: true, changeOrigin: true },
};

export default defineConfig({
  root: fileURLToPath(new URL("./demo", import.meta.url)),
  base: "./", // relative asset paths: the build can be served under any prefix
  plugins: [react()],
  resolve: {
    // The demo imports the package by its name, as an app that adopted it would.
    alias: { "@tickguard/react": fileURLToPath(new URL("./src/index.ts", import.meta.url)) },
  },
  define: {
    "import.meta.env.VITE_API_BASE_URL": JSON.stringify(process.env.VITE_API_BASE_URL ?? "/"),
  },
  build: { outDir: "dist", emptyOutDir: true },
  server: { port: 5173, strictPort: true, proxy },
  preview: { port: 4173, proxy },
});
