import { describe, expect, it } from "vitest";
import { classifyEventSeq, parseServerMessage } from "../src/events";

const position = {
  id: "p1",
  userId: "u",
  symbol: "BTC-USD",
  side: "long",
  entryPrice: 1,
  takeProfit: null,
  stopLoss: null,
  status: "closed",
  closePrice: 1,
  closeReason: "manual",
  createdAt: "2026-01-01T00:00:00.000Z",
  updatedAt: "2026-01-01T00:00:00.000Z",
  closedAt: "2026-01-01T00:00:00.000Z",
};

describe("parseServerMessage", () => {
  it("recognises ready and position events, with or without seq", () => {
    expect(parseServerMessage('{"type":"connection.ready","message":"x","seq":4}')).toEqual({
      type: "connection.ready",
      message: "x",
      seq: 4,
    });
    const closed = { type: "position.closed", source: "engine", seq: 5, position };
    expect(parseServerMessage(JSON.stringify(closed))).toEqual(closed);
    const oldBackend = { type: "position.created", source: "api", position };
    expect(parseServerMessage(JSON.stringify(oldBackend))).toEqual(oldBackend);
  });

  it("ignores malformed and unknown frames instead of throwing", () => {
    for (const frame of [
      "not json",
      "null",
      "[1]",
      '"text"',
      '{"type":"pong"}',
      '{"type":"position.closed","source":"api"}',
      '{"type":"position.closed","position":{"id":1}}',
      '{"type":"position.closed","seq":"7","position":' + JSON.stringify(position) + "}",
      new ArrayBuffer(4),
    ]) {
      expect(parseServerMessage(frame)).toBeNull();
    }
  });
});

describe("classifyEventSeq", () => {
  it("tells next, gap, duplicate and first apart", () => {
    expect(classifyEventSeq(null, 9)).toBe("first");
    expect(classifyEventSeq(3, 4)).toBe("next");
    expect(classifyEventSeq(3, 6)).toBe("gap");
    expect(classifyEventSeq(3, 3)).toBe("duplicate");
    expect(classifyEventSeq(3, 1)).toBe("duplicate");
  });
});
