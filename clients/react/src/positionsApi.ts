/**
 * tickguard's REST client: the types and functions of the React app's `positionsApi.ts`
 * (same names, same shapes), plus what tickguard adds (`getPosition`,
 * `listClosedPositions`, optional `entryPrice`).
 *
 * Every function resolves with the `data` of a 2xx answer and throws
 * `Error(body.error ?? "HTTP <status>")` otherwise, so the server's sentence is the message.
 */

export type PositionSide = "long" | "short";
export type PositionStatus = "open" | "closed";
export type CloseReason = "take_profit" | "stop_loss" | "manual" | "system";

/** A position as the server writes it (camelCase, prices as JSON numbers, dates as ISO strings). */
export interface Position {
  id: string;
  userId: string;
  symbol: string;
  side: PositionSide;
  entryPrice: number;
  takeProfit: number | null;
  stopLoss: number | null;
  status: PositionStatus;
  closePrice: number | null;
  closeReason: CloseReason | null;
  createdAt: string;
  updatedAt: string;
  closedAt: string | null;
  /** Coinbase trade time that triggered an engine close (tickguard only). */
  triggeredAt?: string | null;
}

/**
 * What `createPosition` sends. Prices may be numbers or decimal strings (the server parses
 * both exactly; a string avoids any float rounding on the way out). `entryPrice` may be
 * omitted: the server then uses the last price its feed saw for the symbol.
 */
export interface CreatePositionPayload {
  userId: string;
  symbol: string;
  side: PositionSide;
  entryPrice?: number | string;
  takeProfit: number | string | null;
  stopLoss: number | string | null;
}

/**
 * Where the API is: `VITE_API_BASE_URL`, default `http://localhost:8080`. A value starting with
 * `/` means "this page's origin" with that path prefix (how the demo is served by tickguard
 * itself or behind a proxy). No trailing slash.
 */
export const API_BASE_URL: string = resolveBaseUrl(
  import.meta.env?.VITE_API_BASE_URL as string | undefined,
);

function resolveBaseUrl(configured: string | undefined): string {
  const value = configured || "http://localhost:8080";
  const absolute = value.startsWith("/") ? new URL(value, globalThis.location.origin).href : value;
  return absolute.replace(/\/+$/, "");
}

/** Sends `init` to `API_BASE_URL + path`; returns `data` on 2xx, throws the server's `error`. */
async function request<T>(path: string, init?: RequestInit): Promise<T> {
  const response = await fetch(`${API_BASE_URL}${path}`, {
    ...init,
    headers: init?.body ? { "Content-Type": "application/json" } : undefined,
  });
  // A proxy's HTML error page or an empty body must still surface as "HTTP <status>".
  const body = (await response.json().catch(() => null)) as { data?: T; error?: unknown } | null;
  if (!response.ok) {
    const message = typeof body?.error === "string" ? body.error : undefined;
    throw new Error(message ?? `HTTP ${response.status}`);
  }
  if (body === null || !("data" in body)) {
    throw new Error(`HTTP ${response.status}: response has no data`);
  }
  return body.data as T;
}

function userQuery(userId: string, extra: Record<string, string> = {}): string {
  return new URLSearchParams({ userId, ...extra }).toString();
}

/** POST /api/positions: creates a position; resolves with it as stored (status `open`). */
export function createPosition(body: CreatePositionPayload): Promise<Position> {
  return request<Position>("/api/positions", { method: "POST", body: JSON.stringify(body) });
}

/** GET /api/positions: the user's positions, newest first, optionally only `open` or `closed`. */
export function listPositions(userId: string, status?: PositionStatus): Promise<Position[]> {
  const query = userQuery(userId, status ? { status } : {});
  return request<Position[]>(`/api/positions?${query}`);
}

/** GET /api/positions/closed: the user's closed positions, most recently closed first. */
export function listClosedPositions(userId: string): Promise<Position[]> {
  return request<Position[]>(`/api/positions/closed?${userQuery(userId)}`);
}

/** GET /api/positions/{id}: one of the user's positions (throws "Position not found." else). */
export function getPosition(userId: string, positionId: string): Promise<Position> {
  const path = `/api/positions/${encodeURIComponent(positionId)}?${userQuery(userId)}`;
  return request<Position>(path);
}

/**
 * POST /api/positions/{id}/close with reason `manual`: resolves with the closed position;
 * throws "Position is already closed." or "Position not found." as the server says.
 */
export function closePosition(
  userId: string,
  positionId: string,
  closePrice: number | string,
): Promise<Position> {
  return request<Position>(`/api/positions/${encodeURIComponent(positionId)}/close`, {
    method: "POST",
    body: JSON.stringify({ userId, closePrice, reason: "manual" }),
  });
}

/** The WebSocket URL of the user's event channel: the base URL with http→ws, path `/ws`. */
export function backendWsUrl(userId: string): string {
  // Replacing the scheme's prefix keeps any path prefix of the base URL (http→ws, https→wss).
  return `${API_BASE_URL.replace(/^http/, "ws")}/ws?${userQuery(userId)}`;
}
