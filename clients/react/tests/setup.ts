import { cleanup } from "@testing-library/react";
import { afterEach, inject, vi } from "vitest";

// positionsApi reads VITE_API_BASE_URL when it is first imported, which is after this file.
vi.stubEnv("VITE_API_BASE_URL", inject("apiBaseUrl"));

afterEach(() => cleanup());
