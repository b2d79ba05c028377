/**
 * How the client's list of positions absorbs what it hears, in any order: REST snapshots,
 * create/close responses and WebSocket events are all merged by id. A position only moves
 * forward (open → closed), so the rules are:
 *
 * - a closed copy always wins over an open one (a close never reverts to open);
 * - between two copies of the same status, the later `updatedAt` wins (ties keep the current);
 * - an unknown id is added, wherever it came from.
 *
 * Pure functions, no I/O; each returns the same array when nothing changed, so React can skip
 * a render.
 */

import type { Position } from "./positionsApi";

/** True when `incoming` carries a later state of the position than `current`. */
export function isNewer(incoming: Position, current: Position): boolean {
  if (current.status !== incoming.status) return incoming.status === "closed";
  return Date.parse(incoming.updatedAt) > Date.parse(current.updatedAt);
}

/** Newest `createdAt` first; the id breaks ties so that the order never depends on arrival. */
export function compareNewestFirst(a: Position, b: Position): number {
  const byCreated = Date.parse(b.createdAt) - Date.parse(a.createdAt);
  if (byCreated !== 0) return byCreated;
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

/** `list` with `incoming` merged in by id (see the module rules), newest first. */
export function mergePositions(
  list: readonly Position[],
  incoming: readonly Position[],
): readonly Position[] {
  const byId = new Map(list.map((position) => [position.id, position]));
  let changed = false;
  for (const position of incoming) {
    const current = byId.get(position.id);
    if (current === undefined || isNewer(position, current)) {
      byId.set(position.id, position);
      changed = true;
    }
  }
  if (!changed) return list;
  return [...byId.values()].sort(compareNewestFirst);
}

/** The open positions of `list`, in its order (newest first). */
export function openOf(list: readonly Position[]): Position[] {
  return list.filter((position) => position.status === "open");
}

/** The closed positions of `list`, most recently closed first (as GET /positions/closed). */
export function closedOf(list: readonly Position[]): Position[] {
  return list
    .filter((position) => position.status === "closed")
    .sort((a, b) => Date.parse(b.closedAt ?? b.updatedAt) - Date.parse(a.closedAt ?? a.updatedAt));
}
