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

/**
 * A bearer token for a tickguard that authenticates (`AUTH_JWKS_URL` set): the token itself,
 * or a function returning the current one (called before every request and every WebSocket
 * connect, so a refreshed token is picked up). No token (`undefined`, `null`, `""`): nothing
 * is sent, exactly as the first client did.
 */
export type TokenSource =
  | string
  | null
  | undefined
  | (() => string | null | undefined | Promise<string | null | undefined>);

/** Per-call options of the REST functions. */
export interface RequestOptions {
  /** Sent as `Authorization: Bearer <token>`; the server then takes the user from it. */
  token?: TokenSource;
}

/** The token `source` stands for now, or null when there is none. */
export async function resolveToken(source: TokenSource): Promise<string | null> {
  const token = typeof source === "function" ? await source() : source;
  return token ? token : null;
}

/** Sends `init` to `API_BASE_URL + path`; returns `data` on 2xx, throws the server's `error`. */
async function request<T>(path: string, init?: RequestInit, options?: RequestOptions): Promise<T> {
  const headers: Record<string, string> = {};
  if (init?.body) headers["Content-Type"] = "application/json";
  const token = await resolveToken(options?.token);
  if (token !== null) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(`${API_BASE_URL}${path}`, {
    ...init,
    headers: Object.keys(headers).length > 0 ? headers : undefined,
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

/**
 * The query naming the user. With a token an empty `userId` is left out (the server takes the
 * token's user); without one it is sent as given, as the first client did.
 */
function userQuery(
  userId: string,
  extra: Record<string, string> = {},
  options?: RequestOptions,
): string {
  const withUser = userId || !options?.token ? { userId, ...extra } : extra;
  return new URLSearchParams(withUser).toString();
}

function withQuery(path: string, query: string): string {
  return query ? `${path}?${query}` : path;
}

/**
 * POST /api/positions: creates a position; resolves with it as stored (status `open`). With a
 * token, `userId` may be left out of the body (it must be the token's user when given).
 */
export function createPosition(
  body: CreatePositionPayload | Omit<CreatePositionPayload, "userId">,
  options?: RequestOptions,
): Promise<Position> {
  const init = { method: "POST", body: JSON.stringify(body) };
  return request<Position>("/api/positions", init, options);
}

/** GET /api/positions: the user's positions, newest first, optionally only `open` or `closed`. */
export function listPositions(
  userId: string,
  status?: PositionStatus,
  options?: RequestOptions,
): Promise<Position[]> {
  const query = userQuery(userId, status ? { status } : {}, options);
  return request<Position[]>(withQuery("/api/positions", query), undefined, options);
}

/** GET /api/positions/closed: the user's closed positions, most recently closed first. */
export function listClosedPositions(userId: string, options?: RequestOptions): Promise<Position[]> {
  const query = userQuery(userId, {}, options);
  return request<Position[]>(withQuery("/api/positions/closed", query), undefined, options);
}

/** GET /api/positions/{id}: one of the user's positions (throws "Position not found." else). */
export function getPosition(
  userId: string,
  positionId: string,
  options?: RequestOptions,
): Promise<Position> {
  const path = `/api/positions/${encodeURIComponent(positionId)}`;
  return request<Position>(withQuery(path, userQuery(userId, {}, options)), undefined, options);
}

/**
 * POST /api/positions/{id}/close with reason `manual`: resolves with the closed position;
 * throws "Position is already closed." or "Position not found." as the server says.
 */
export function closePosition(
  userId: string,
  positionId: string,
  closePrice: number | string,
  options?: RequestOptions,
): Promise<Position> {
  const close = { closePrice, reason: "manual" };
  const body = userId || !options?.token ? { userId, ...close } : close;
  return request<Position>(
    `/api/positions/${encodeURIComponent(positionId)}/close`,
    { method: "POST", body: JSON.stringify(body) },
    options,
  );
}

/**
 * The WebSocket URL of the user's event channel: the base URL with http→ws, path `/ws`; with a
 * `token`, also `token=<token>` (browsers cannot set headers on a WebSocket), and `userId` only
 * when not empty.
 */
export function backendWsUrl(userId: string, token?: string | null): string {
  const extra: Record<string, string> = token ? { token } : {};
  const query = userQuery(userId, extra, token ? { token } : undefined);
  // Replacing the scheme's prefix keeps any path prefix of the base URL (http→ws, https→wss).
  return withQuery(`${API_BASE_URL.replace(/^http/, "ws")}/ws`, query);
}
