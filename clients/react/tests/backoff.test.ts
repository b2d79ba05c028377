import { describe, expect, it } from "vitest";
import { reconnectDelay } from "../src/backoff";

describe("reconnectDelay", () => {
  it("has the earlier client's ceiling: 1 s doubling to 30 s", () => {
    const ceiling = (attempt: number) => reconnectDelay(attempt, { random: () => 0.999999999 });
    expect([0, 1, 2, 3, 4, 5, 6, 50, 2000].map(ceiling)).toEqual([
      999, 1999, 3999, 7999, 15999, 29999, 29999, 29999, 29999,
    ]);
  });

  it("spreads the delay over the whole window (full jitter)", () => {
    expect(reconnectDelay(3, { random: () => 0 })).toBe(0);
    expect(reconnectDelay(3, { random: () => 0.5 })).toBe(4000);
    const delays = Array.from({ length: 200 }, () => reconnectDelay(2));
    expect(Math.min(...delays)).toBeGreaterThanOrEqual(0);
    expect(Math.max(...delays)).toBeLessThan(4000);
    expect(new Set(delays).size).toBeGreaterThan(50);
  });

  it("honours a custom base and cap", () => {
    const top = { baseMs: 10, maxMs: 25, random: () => 0.999999999 };
    expect([0, 1, 2, 3].map((attempt) => reconnectDelay(attempt, top))).toEqual([9, 19, 24, 24]);
  });
});
