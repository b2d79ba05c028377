import { describe, expect, it } from "vitest";
import type { Position } from "../src/positionsApi";
import { closedOf, mergePositions, openOf } from "../src/positionsState";

function position(id: string, overrides: Partial<Position> = {}): Position {
  return {
    id,
    userId: "u",
    symbol: "BTC-USD",
    side: "long",
    entryPrice: 65000,
    takeProfit: 70000,
    stopLoss: 60000,
    status: "open",
    closePrice: null,
    closeReason: null,
    createdAt: `2026-01-01T00:00:0${id.length % 10}.000Z`,
    updatedAt: "2026-01-01T00:00:00.000Z",
    closedAt: null,
    ...overrides,
  };
}

function closed(p: Position, closedAt = "2026-01-01T00:01:00.000Z"): Position {
  return {
    ...p,
    status: "closed",
    closePrice: 60000,
    closeReason: "stop_loss",
    closedAt,
    updatedAt: closedAt,
  };
}

/** Every order of `items` (small inputs only). */
function permutations<T>(items: readonly T[]): T[][] {
  if (items.length <= 1) return [[...items]];
  return items.flatMap((item, i) =>
    permutations([...items.slice(0, i), ...items.slice(i + 1)]).map((rest) => [item, ...rest]),
  );
}

describe("mergePositions", () => {
  const a = position("a", { createdAt: "2026-01-01T00:00:01.000Z" });
  const b = position("b", { createdAt: "2026-01-01T00:00:02.000Z" });

  it("adds unknown ids newest first and lists each id once", () => {
    const list = mergePositions(mergePositions([], [a]), [b, a]);
    expect(list.map((p) => p.id)).toEqual(["b", "a"]);
  });

  it("returns the same array when nothing changes", () => {
    const list = mergePositions([], [a, b]);
    expect(mergePositions(list, [a])).toBe(list);
    expect(mergePositions(list, [])).toBe(list);
  });

  it("never reverts a closed position to open", () => {
    const list = mergePositions([], [closed(a)]);
    const after = mergePositions(list, [a]);
    expect(after).toBe(list);
    expect(after[0].status).toBe("closed");
  });

  it("takes the later updatedAt between two copies of one status", () => {
    const edited = { ...a, updatedAt: "2026-01-01T00:00:05.000Z", takeProfit: 71000 };
    expect(mergePositions([a], [edited])[0].takeProfit).toBe(71000);
    expect(mergePositions([edited], [a])[0].takeProfit).toBe(71000);
  });

  it("ends in the same state whatever order snapshots, responses and events arrive in", () => {
    // The create response, the created event, the closed event and a stale REST list (taken
    // before the close) for `a`, plus `b` created in another tab.
    const deliveries: Position[][] = [[a], [a], [closed(a)], [a, b], [b]];
    const expected = mergePositions([], [closed(a), b]);
    for (const order of permutations(deliveries)) {
      const final = order.reduce<readonly Position[]>(mergePositions, []);
      expect(final).toEqual(expected);
    }
  });

  it("splits open and closed, closed by most recent close first", () => {
    const c = position("c", { createdAt: "2026-01-01T00:00:03.000Z" });
    const list = mergePositions([], [
      closed(a, "2026-01-01T00:05:00.000Z"),
      b,
      closed(c, "2026-01-01T00:04:00.000Z"),
    ]);
    expect(openOf(list).map((p) => p.id)).toEqual(["b"]);
    expect(closedOf(list).map((p) => p.id)).toEqual(["a", "c"]);
  });
});
