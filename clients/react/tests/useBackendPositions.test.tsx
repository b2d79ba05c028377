import { act, renderHook, waitFor } from "@testing-library/react";
import { describe, expect, it } from "vitest";
import { closePosition, createPosition, type Position } from "../src/positionsApi";
import { type UseBackendPositionsOptions, useBackendPositions } from "../src/useBackendPositions";
import { freshUser, publish } from "./helpers";

const wide = { takeProfit: 10_000_000, stopLoss: 1 } as const;

function ids(list: Position[]): string[] {
  return list.map((position) => position.id);
}

/** Renders the hook and waits for its first load and its event channel. */
async function mounted(options: UseBackendPositionsOptions) {
  const hook = renderHook((props: UseBackendPositionsOptions) => useBackendPositions(props), {
    initialProps: options,
  });
  await waitFor(() => expect(hook.result.current.loading).toBe(false));
  await waitFor(() => expect(hook.result.current.connection).toBe("open"));
  return hook;
}

describe("useBackendPositions against a real tickguard", () => {
  it("loads the user's positions on mount, newest first", async () => {
    const userId = freshUser("positions-load");
    const older = await createPosition({ userId, symbol: "BTC-USD", side: "long", entryPrice: 65000, ...wide });
    const newer = await createPosition({ userId, symbol: "ETH-USD", side: "long", entryPrice: 3000, ...wide });
    const done = await closePosition(userId, older.id, 65010);
    const { result } = await mounted({ userId });
    expect(result.current.error).toBeNull();
    expect(ids(result.current.positions)).toEqual([newer.id, older.id]);
    expect(result.current.openPositions).toEqual([newer]);
    expect(result.current.closedPositions).toEqual([done]);
  });

  it("create and close keep one copy of each position, consistent with the events", async () => {
    const userId = freshUser("positions-actions");
    const { result } = await mounted({ userId });
    let created: Position | undefined;
    await act(async () => {
      created = await result.current.create({ symbol: "btc-usd", side: "long", entryPrice: "65000", ...wide });
    });
    expect(created).toMatchObject({ userId, symbol: "BTC-USD", status: "open" });
    expect(ids(result.current.openPositions)).toEqual([created!.id]);

    await act(async () => {
      await result.current.close(created!.id, "65000.5");
    });
    expect(result.current.openPositions).toEqual([]);
    expect(result.current.closedPositions).toHaveLength(1);
    expect(result.current.closedPositions[0]).toMatchObject({ id: created!.id, closeReason: "manual", closePrice: 65000.5 });

    // The created and closed events (and the first ready's resync) arrive too: still one copy.
    await act(() => result.current.reload());
    expect(result.current.positions).toHaveLength(1);
    expect(result.current.positions[0].status).toBe("closed");
  });

  it("shows positions created and closed in another tab", async () => {
    const userId = freshUser("positions-tab");
    const { result } = await mounted({ userId });
    const elsewhere = await createPosition({ userId, symbol: "ETH-USD", side: "long", entryPrice: 3000, ...wide });
    await waitFor(() => expect(ids(result.current.openPositions)).toEqual([elsewhere.id]));
    await closePosition(userId, elsewhere.id, 3001);
    await waitFor(() => expect(ids(result.current.closedPositions)).toEqual([elsewhere.id]));
    expect(result.current.openPositions).toEqual([]);
  });

  it("moves a position to closed when the engine's stop-loss fires", async () => {
    const userId = freshUser("positions-engine");
    const { result } = await mounted({ userId });
    let created: Position | undefined;
    await act(async () => {
      created = await result.current.create({ symbol: "ETH-USD", side: "long", entryPrice: 3000, takeProfit: 100000, stopLoss: 2500 });
    });
    await publish("ETH-USD", "2400");
    await waitFor(() => expect(ids(result.current.closedPositions)).toEqual([created!.id]), { timeout: 10_000 });
    expect(result.current.closedPositions[0]).toMatchObject({ closeReason: "stop_loss", closePrice: 2500 });
    expect(result.current.openPositions).toEqual([]);
  });

  it("ends closed when the close races the create response", async () => {
    // The bracket is already crossed by the market: the engine closes it on the next window,
    // so the closed event may well arrive before the create response does.
    const userId = freshUser("positions-race");
    const { result } = await mounted({ userId });
    let created: Position | undefined;
    await act(async () => {
      created = await result.current.create({ symbol: "BTC-USD", side: "long", entryPrice: 100000, takeProfit: 200000, stopLoss: 90000 });
    });
    await waitFor(() => expect(ids(result.current.closedPositions)).toEqual([created!.id]), { timeout: 10_000 });
    expect(result.current.closedPositions[0].closeReason).toBe("stop_loss");
    expect(result.current.positions).toHaveLength(1);
    // A later stale open copy (the create response) cannot reopen it.
    await act(() => result.current.reload());
    expect(result.current.openPositions).toEqual([]);
  });

  it("reloads after a reconnect that missed events", async () => {
    const userId = freshUser("positions-gap");
    const sockets: WebSocket[] = [];
    class Recording extends WebSocket {
      constructor(url: string | URL) {
        super(url);
        sockets.push(this);
      }
    }
    const { result } = await mounted({
      userId,
      backoff: { baseMs: 1500, random: () => 0.999 },
      WebSocketImpl: Recording as typeof WebSocket,
    });
    sockets[0].send("x".repeat(70 * 1024)); // the server closes the session (1009)
    await waitFor(() => expect(result.current.connection).toBe("reconnecting"));
    const missed = await createPosition({ userId, symbol: "BTC-USD", side: "long", entryPrice: 65000, ...wide });
    await waitFor(() => expect(ids(result.current.openPositions)).toEqual([missed.id]), { timeout: 5_000 });
    expect(sockets).toHaveLength(2);
  });

  it("surfaces a load error as the server's message and recovers on reload", async () => {
    const { result, rerender } = renderHook(
      (props: UseBackendPositionsOptions) => useBackendPositions(props),
      { initialProps: { userId: "x".repeat(200) } },
    );
    await waitFor(() => expect(result.current.loading).toBe(false));
    expect(result.current.error).toMatch(/userId/);
    expect(result.current.positions).toEqual([]);

    const userId = freshUser("positions-recover");
    const created = await createPosition({ userId, symbol: "BTC-USD", side: "long", entryPrice: 65000, ...wide });
    rerender({ userId });
    await waitFor(() => expect(ids(result.current.positions)).toEqual([created.id]));
    expect(result.current.error).toBeNull();
  });

  it("never shows one user's positions under another user id", async () => {
    const first = freshUser("positions-a");
    const second = freshUser("positions-b");
    const mine = await createPosition({ userId: first, symbol: "BTC-USD", side: "long", entryPrice: 65000, ...wide });
    const theirs = await createPosition({ userId: second, symbol: "BTC-USD", side: "long", entryPrice: 65000, ...wide });
    const { result, rerender } = await mounted({ userId: first });
    expect(ids(result.current.positions)).toEqual([mine.id]);
    rerender({ userId: second });
    expect(result.current.positions.map((p) => p.userId)).not.toContain(first);
    await waitFor(() => expect(ids(result.current.positions)).toEqual([theirs.id]));
  });
});
