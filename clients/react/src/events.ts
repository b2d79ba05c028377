/**
 * The messages of tickguard's `/ws` channel, parsed from raw frames, and the per-user `seq`
 * bookkeeping that tells a client it missed something.
 */

import type { Position } from "./positionsApi";

export type EventSource = "api" | "engine";

export interface ConnectionReadyMessage {
  type: "connection.ready";
  message: string;
  /** The user's latest event number when the session joined (absent on the old backend). */
  seq?: number;
}

export interface PositionCreatedEvent {
  type: "position.created";
  source: EventSource;
  position: Position;
  seq?: number;
}

export interface PositionClosedEvent {
  type: "position.closed";
  source: EventSource;
  position: Position;
  seq?: number;
}

export type PositionEvent = PositionCreatedEvent | PositionClosedEvent;
export type ServerMessage = ConnectionReadyMessage | PositionEvent;

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function isPositionLike(value: unknown): value is Position {
  return (
    isObject(value) &&
    typeof value.id === "string" &&
    (value.status === "open" || value.status === "closed") &&
    typeof value.updatedAt === "string" &&
    typeof value.createdAt === "string"
  );
}

/**
 * One frame's text as a known server message, or null for anything else (malformed JSON,
 * `pong`, unknown types, events without a usable position): those are ignored, never thrown.
 */
export function parseServerMessage(data: unknown): ServerMessage | null {
  if (typeof data !== "string") return null;
  let message: unknown;
  try {
    message = JSON.parse(data);
  } catch {
    return null;
  }
  if (!isObject(message)) return null;
  if (message.seq !== undefined && !Number.isSafeInteger(message.seq)) return null;
  if (message.type === "connection.ready") return message as unknown as ConnectionReadyMessage;
  if (message.type === "position.created" || message.type === "position.closed") {
    return isPositionLike(message.position) ? (message as unknown as PositionEvent) : null;
  }
  return null;
}

/** What an event's or a ready's `seq` means after `lastSeq` (null: nothing seen yet). */
export type SeqVerdict = "first" | "next" | "duplicate" | "gap";

/**
 * Classifies an event's `seq` against the last one seen. Events are numbered without gaps per
 * user, so a jump means events were missed (reload over REST) and a seq already seen is a
 * duplicate to drop.
 */
export function classifyEventSeq(lastSeq: number | null, seq: number): SeqVerdict {
  if (lastSeq === null) return "first";
  if (seq <= lastSeq) return "duplicate";
  return seq === lastSeq + 1 ? "next" : "gap";
}
