import { renderHook, waitFor } from "@testing-library/react";
import { describe, expect, it, vi } from "vitest";
import type { PositionClosedEvent, PositionCreatedEvent } from "../src/events";
import { closePosition, createPosition } from "../src/positionsApi";
import { usePositionEvents } from "../src/usePositionEvents";
import { freshUser, publish } from "./helpers";

/** The global WebSocket, recording each socket the hook opens so a test can act on it. */
function recordingWebSocket() {
  const sockets: WebSocket[] = [];
  class Recording extends WebSocket {
    constructor(url: string | URL, protocols?: string | string[]) {
      super(url, protocols);
      sockets.push(this);
    }
  }
  return { sockets, WebSocketImpl: Recording as typeof WebSocket };
}

const wide = { takeProfit: 10_000_000, stopLoss: 1 } as const;

describe("usePositionEvents against a real tickguard", () => {
  it("announces ready with the user's seq and delivers created and closed events", async () => {
    const userId = freshUser("events");
    const onCreated = vi.fn<(event: PositionCreatedEvent) => void>();
    const onClosed = vi.fn<(event: PositionClosedEvent) => void>();
    const onReady = vi.fn();
    const { result } = renderHook(() =>
      usePositionEvents({ userId, onClosed, onCreated, onReady }),
    );
    await waitFor(() => expect(onReady).toHaveBeenCalledTimes(1));
    expect(onReady.mock.calls[0][0]).toEqual({ seq: 0, reconnected: false });
    expect(result.current.state).toBe("open");

    const created = await createPosition({ userId, symbol: "BTC-USD", side: "long", entryPrice: 65000, ...wide });
    await waitFor(() => expect(onCreated).toHaveBeenCalledTimes(1));
    expect(onCreated.mock.calls[0][0]).toMatchObject({
      type: "position.created",
      source: "api",
      seq: 1,
      position: created,
    });

    await closePosition(userId, created.id, "65001");
    await waitFor(() => expect(onClosed).toHaveBeenCalledTimes(1));
    expect(onClosed.mock.calls[0][0]).toMatchObject({
      type: "position.closed",
      source: "api",
      seq: 2,
      position: { id: created.id, status: "closed", closeReason: "manual", closePrice: 65001 },
    });
    expect(result.current.lastSeq).toBe(2);
  });

  it("delivers the engine's stop-loss close when the feed's price crosses the stop", async () => {
    const userId = freshUser("events-engine");
    const onClosed = vi.fn<(event: PositionClosedEvent) => void>();
    const onReady = vi.fn();
    renderHook(() => usePositionEvents({ userId, onClosed, onReady }));
    await waitFor(() => expect(onReady).toHaveBeenCalled());
    const created = await createPosition({
      userId,
      symbol: "ETH-USD",
      side: "short",
      entryPrice: 3000,
      takeProfit: 1,
      stopLoss: 3500,
    });
    await publish("ETH-USD", "3600");
    await waitFor(() => expect(onClosed).toHaveBeenCalledTimes(1), { timeout: 10_000 });
    expect(onClosed.mock.calls[0][0]).toMatchObject({
      source: "engine",
      position: { id: created.id, status: "closed", closeReason: "stop_loss", closePrice: 3500 },
    });
  });

  it("reconnects after the server closes the socket and reports the events it missed", async () => {
    const userId = freshUser("events-gap");
    const { sockets, WebSocketImpl } = recordingWebSocket();
    const onReady = vi.fn();
    const onGap = vi.fn();
    const onCreated = vi.fn();
    const { result } = renderHook(() =>
      usePositionEvents({
        userId,
        onClosed: () => {},
        onCreated,
        onReady,
        onGap,
        // Always the longest delay of a 1.5 s window: time to create a position meanwhile.
        backoff: { baseMs: 1500, random: () => 0.999 },
        WebSocketImpl,
      }),
    );
    await waitFor(() => expect(onReady).toHaveBeenCalledTimes(1));

    // A frame over 64 KiB makes the server close this session (1009): a server-side close.
    sockets[0].send("x".repeat(70 * 1024));
    await waitFor(() => expect(result.current.state).toBe("reconnecting"));
    expect(sockets[0].readyState).toBe(WebSocket.CLOSED);
    const missed = await createPosition({ userId, symbol: "BTC-USD", side: "short", entryPrice: 65000, takeProfit: 1, stopLoss: 10_000_000 });

    await waitFor(() => expect(onReady).toHaveBeenCalledTimes(2), { timeout: 5_000 });
    expect(sockets).toHaveLength(2);
    expect(onReady.mock.calls[1][0]).toEqual({ seq: 1, reconnected: true });
    expect(onGap).toHaveBeenCalledWith({ lastSeq: 0, seq: 1 });
    // The missed event is not replayed: the gap callback is how the caller learns of it.
    expect(onCreated).not.toHaveBeenCalled();
    expect(result.current).toMatchObject({ state: "open", attempt: 0, lastSeq: 1 });
    expect(missed.status).toBe("open");
  });

  it("does not report a gap when nothing happened while it was away", async () => {
    const userId = freshUser("events-nogap");
    const { sockets, WebSocketImpl } = recordingWebSocket();
    const onReady = vi.fn();
    const onGap = vi.fn();
    renderHook(() =>
      usePositionEvents({
        userId,
        onClosed: () => {},
        onReady,
        onGap,
        backoff: { baseMs: 50 },
        WebSocketImpl,
      }),
    );
    await waitFor(() => expect(onReady).toHaveBeenCalledTimes(1));
    sockets[0].send("x".repeat(70 * 1024));
    await waitFor(() => expect(onReady).toHaveBeenCalledTimes(2), { timeout: 5_000 });
    expect(onGap).not.toHaveBeenCalled();
  });

  it("closes its socket on unmount and does not reconnect", async () => {
    const userId = freshUser("events-unmount");
    const { sockets, WebSocketImpl } = recordingWebSocket();
    const onReady = vi.fn();
    const { unmount } = renderHook(() =>
      usePositionEvents({ userId, onClosed: () => {}, onReady, backoff: { baseMs: 1 }, WebSocketImpl }),
    );
    await waitFor(() => expect(onReady).toHaveBeenCalledTimes(1));
    unmount();
    await waitFor(() => expect(sockets[0].readyState).toBe(WebSocket.CLOSED));
    // A retry would come within 1 ms of the close; give it far longer than that.
    await new Promise((done) => setTimeout(done, 200));
    expect(sockets).toHaveLength(1);
  });

  it("stops after the server rejects the user id (1008) and stays idle without one", async () => {
    const { sockets, WebSocketImpl } = recordingWebSocket();
    const { result, rerender } = renderHook(
      ({ userId }) =>
        usePositionEvents({ userId, onClosed: () => {}, backoff: { baseMs: 1 }, WebSocketImpl }),
      { initialProps: { userId: "bad\u0001user" } },
    );
    await waitFor(() => expect(result.current.state).toBe("closed"));
    await new Promise((done) => setTimeout(done, 200));
    expect(sockets).toHaveLength(1);

    rerender({ userId: "" });
    await waitFor(() => expect(result.current.state).toBe("idle"));
    expect(sockets).toHaveLength(1);
  });

  it("reconnects for the new user when the user id changes", async () => {
    const first = freshUser("events-switch-a");
    const second = freshUser("events-switch-b");
    const { sockets, WebSocketImpl } = recordingWebSocket();
    const onCreated = vi.fn<(event: PositionCreatedEvent) => void>();
    const onReady = vi.fn();
    const { rerender } = renderHook(
      ({ userId }) => usePositionEvents({ userId, onClosed: () => {}, onCreated, onReady, WebSocketImpl }),
      { initialProps: { userId: first } },
    );
    await waitFor(() => expect(onReady).toHaveBeenCalledTimes(1));
    rerender({ userId: second });
    await waitFor(() => expect(onReady).toHaveBeenCalledTimes(2));
    expect(onReady.mock.calls[1][0]).toEqual({ seq: 0, reconnected: false });
    await waitFor(() => expect(sockets[0].readyState).toBe(WebSocket.CLOSED));
    const created = await createPosition({ userId: second, symbol: "BTC-USD", side: "long", entryPrice: 65000, ...wide });
    await waitFor(() => expect(onCreated).toHaveBeenCalledTimes(1));
    expect(onCreated.mock.calls[0][0].position.id).toBe(created.id);
  });
});
