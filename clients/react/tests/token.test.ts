import { createServer, type IncomingMessage } from "node:http";
import type { AddressInfo } from "node:net";
import { describe, expect, inject, it, vi } from "vitest";

interface Seen {
  method: string;
  url: string;
  authorization: string | undefined;
  body: string;
}

/** A real local HTTP server recording what the client sends, answering `{"data": []}`. */
async function recorder(): Promise<{ base: string; seen: Seen[]; close: () => void }> {
  const seen: Seen[] = [];
  const server = createServer((request: IncomingMessage, response) => {
    let body = "";
    request.on("data", (chunk: Buffer) => {
      body += chunk.toString();
    });
    request.on("end", () => {
      seen.push({
        method: request.method ?? "",
        url: request.url ?? "",
        authorization: request.headers.authorization,
        body,
      });
      response.writeHead(200, { "Content-Type": "application/json" }).end('{"data": []}');
    });
  });
  await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
  const { port } = server.address() as AddressInfo;
  return { base: `http://127.0.0.1:${port}`, seen, close: () => server.close() };
}

async function apiAt(base: string) {
  vi.stubEnv("VITE_API_BASE_URL", base);
  vi.resetModules();
  return import("../src/positionsApi");
}

describe("the token option", () => {
  it("sends Authorization: Bearer only when given a token, from a string or a provider", async () => {
    const server = await recorder();
    try {
      const api = await apiAt(server.base);
      await api.listPositions("alice");
      await api.listPositions("alice", "open", { token: "t1" });
      let calls = 0;
      const provider = async () => `fresh-${++calls}`;
      await api.listClosedPositions("", { token: provider });
      await api.getPosition("", "p1", { token: provider });
      await api.createPosition({ symbol: "BTC-USD", side: "long", takeProfit: null, stopLoss: null }, {
        token: "t2",
      });
      await api.closePosition("", "p1", "66000", { token: "t3" });
      await api.closePosition("alice", "p1", "66000");
      await api.listPositions("alice", undefined, { token: () => null });
      const [plain, withToken, closed, one, created, close, firstClose, none] = server.seen;
      // The first client's requests are unchanged: no header, userId as given.
      expect(plain).toMatchObject({ url: "/api/positions?userId=alice", authorization: undefined });
      expect(JSON.parse(firstClose.body)).toEqual({
        userId: "alice",
        closePrice: "66000",
        reason: "manual",
      });
      expect(firstClose.authorization).toBeUndefined();
      expect(none.authorization).toBeUndefined();
      // With a token: the header, and no empty userId.
      expect(withToken).toMatchObject({
        url: "/api/positions?userId=alice&status=open",
        authorization: "Bearer t1",
      });
      expect(closed).toMatchObject({ url: "/api/positions/closed", authorization: "Bearer fresh-1" });
      expect(one).toMatchObject({ url: "/api/positions/p1", authorization: "Bearer fresh-2" });
      expect(created.authorization).toBe("Bearer t2");
      expect(JSON.parse(created.body)).not.toHaveProperty("userId");
      expect(close.authorization).toBe("Bearer t3");
      expect(JSON.parse(close.body)).toEqual({ closePrice: "66000", reason: "manual" });
    } finally {
      vi.stubEnv("VITE_API_BASE_URL", inject("apiBaseUrl"));
      server.close();
    }
  });

  it("puts the token in the WebSocket URL's query", async () => {
    const api = await apiAt(inject("apiBaseUrl"));
    const later = new URL(api.backendWsUrl("", "abc.def.ghi"));
    expect(later.searchParams.get("token")).toBe("abc.def.ghi");
    expect(later.searchParams.has("userId")).toBe(false);
    const both = new URL(api.backendWsUrl("alice", "abc.def.ghi"));
    expect(both.searchParams.get("userId")).toBe("alice");
    expect(both.searchParams.get("token")).toBe("abc.def.ghi");
    const first = new URL(api.backendWsUrl("alice"));
    expect([...first.searchParams.keys()]).toEqual(["userId"]);
  });
});
