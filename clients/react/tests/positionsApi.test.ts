import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { describe, expect, inject, it, vi } from "vitest";
import {
  API_BASE_URL,
  backendWsUrl,
  closePosition,
  createPosition,
  getPosition,
  listClosedPositions,
  listPositions,
} from "../src/positionsApi";
import { freshUser } from "./helpers";

describe("positionsApi against a real tickguard", () => {
  it("reads its base URL from VITE_API_BASE_URL", () => {
    expect(API_BASE_URL).toBe(inject("apiBaseUrl"));
  });

  it("builds the ws URL from the base URL with the user id in the query", () => {
    const url = new URL(backendWsUrl("a b&c"));
    expect(url.protocol).toBe("ws:");
    expect(url.host).toBe(new URL(API_BASE_URL).host);
    expect(url.pathname).toBe("/ws");
    expect(url.searchParams.get("userId")).toBe("a b&c");
  });

  it("creates, lists, gets and closes a position with exact prices", async () => {
    const userId = freshUser("api");
    const created = await createPosition({
      userId,
      symbol: "btc-usd",
      side: "long",
      entryPrice: "65000.12345678",
      takeProfit: 70000,
      stopLoss: "60000.5",
    });
    expect(created).toMatchObject({
      userId,
      symbol: "BTC-USD",
      side: "long",
      entryPrice: 65000.12345678,
      takeProfit: 70000,
      stopLoss: 60000.5,
      status: "open",
      closePrice: null,
      closeReason: null,
      closedAt: null,
    });
    expect(await listPositions(userId)).toEqual([created]);
    expect(await listPositions(userId, "open")).toEqual([created]);
    expect(await listPositions(userId, "closed")).toEqual([]);
    expect(await getPosition(userId, created.id)).toEqual(created);

    const closed = await closePosition(userId, created.id, "65100.5");
    expect(closed).toMatchObject({
      id: created.id,
      status: "closed",
      closePrice: 65100.5,
      closeReason: "manual",
    });
    expect(closed.closedAt).toEqual(expect.any(String));
    expect(await listClosedPositions(userId)).toEqual([closed]);
    expect(await listPositions(userId, "open")).toEqual([]);
  });

  it("uses the feed's last price when entryPrice is omitted", async () => {
    const userId = freshUser("api-noentry");
    const created = await createPosition({
      userId,
      symbol: "ETH-USD",
      side: "short",
      takeProfit: null,
      stopLoss: null,
    });
    expect(created.entryPrice).toBeGreaterThan(0);
    expect(created.takeProfit).toBeNull();
  });

  it("throws the server's error sentence on a bracket violation", async () => {
    const attempt = createPosition({
      userId: freshUser("api-bad"),
      symbol: "BTC-USD",
      side: "long",
      entryPrice: 100,
      takeProfit: 90,
      stopLoss: null,
    });
    await expect(attempt).rejects.toThrow(
      new Error("For long positions, takeProfit must be above entryPrice."),
    );
  });

  it("throws 'not found' and 'already closed' from close as the server words them", async () => {
    const userId = freshUser("api-close");
    const created = await createPosition({
      userId,
      symbol: "BTC-USD",
      side: "short",
      entryPrice: 65000,
      takeProfit: 60000,
      stopLoss: 70000,
    });
    await expect(closePosition("someone-else", created.id, 1)).rejects.toThrow("Position not found.");
    await closePosition(userId, created.id, 64000);
    await expect(closePosition(userId, created.id, 64000)).rejects.toThrow(
      "Position is already closed.",
    );
    await expect(getPosition("someone-else", created.id)).rejects.toThrow("Position not found.");
  });

  it("says which parameter is wrong when the user id is empty", async () => {
    await expect(listPositions("")).rejects.toThrow(/userId/);
  });

  it("falls back to 'HTTP <status>' when the answer has no error string", async () => {
    // A real server that answers like a proxy's error page: HTML, no JSON body.
    const server = createServer((_request, response) => {
      response.writeHead(502, { "Content-Type": "text/html" }).end("<h1>Bad gateway</h1>");
    });
    await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
    const { port } = server.address() as AddressInfo;
    try {
      vi.stubEnv("VITE_API_BASE_URL", `http://127.0.0.1:${port}/`);
      vi.resetModules();
      const api = await import("../src/positionsApi");
      expect(api.API_BASE_URL).toBe(`http://127.0.0.1:${port}`);
      await expect(api.listPositions("u")).rejects.toThrow(new Error("HTTP 502"));
    } finally {
      vi.stubEnv("VITE_API_BASE_URL", inject("apiBaseUrl"));
      server.close();
    }
  });
});
