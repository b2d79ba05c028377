import type { TestProject } from "vitest/node";
import { startStack } from "./support/servers.mjs";

declare module "vitest" {
  export interface ProvidedContext {
    apiBaseUrl: string;
    simControlUrl: string;
  }
}

/** Starts one tickguard stack for the whole run and stops it (and drops its database) after. */
export default async function setup(project: TestProject) {
  const stack = await startStack({ label: "vitest" });
  project.provide("apiBaseUrl", stack.apiBaseUrl);
  project.provide("simControlUrl", stack.simControlUrl);
  return () => stack.stop();
}
