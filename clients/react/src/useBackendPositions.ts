/**
 * `useBackendPositions`: one user's positions, kept consistent with the server.
 *
 * Loads `listPositions(userId)` on mount, then merges in (by id, see positionsState.ts) every
 * create/close response and every `position.created` / `position.closed` event, so positions
 * opened in another tab appear, nothing is listed twice, an event that beats its REST response
 * changes nothing, and a closed position never reverts to open. It reloads over REST whenever
 * events may have been missed: after the first `connection.ready` (the initial load and the
 * socket's join are not ordered) and whenever `seq` shows a gap.
 */

import { useCallback, useEffect, useMemo, useRef, useState } from "react";
import type { BackoffOptions } from "./backoff";
import type { PositionEvent } from "./events";
import {
  type CreatePositionPayload,
  closePosition,
  createPosition,
  listPositions,
  type Position,
  type RequestOptions,
  type TokenSource,
} from "./positionsApi";
import { closedOf, mergePositions, openOf } from "./positionsState";
import { type ConnectionState, usePositionEvents } from "./usePositionEvents";

export interface UseBackendPositionsOptions {
  /** The user (with a token: the token's `sub`, which the server checks it against). */
  userId: string;
  /**
   * A bearer token, or a function giving the current one, for a server that authenticates:
   * sent on every REST call (`Authorization: Bearer`) and WebSocket connect (`?token=`).
   * Omitted: nothing is sent, as with the first client.
   */
  token?: TokenSource;
  /** Reconnect delays of the event channel (defaults: 1 s doubling to 30 s, full jitter). */
  backoff?: BackoffOptions;
  /** The WebSocket class to use (default: the global one). */
  WebSocketImpl?: typeof WebSocket;
}

export interface BackendPositions {
  /** True until the first load for this user id has finished (successfully or not). */
  loading: boolean;
  /** The last load's error message (the server's `error`), null after a successful load. */
  error: string | null;
  /** All known positions, newest first. */
  positions: Position[];
  openPositions: Position[];
  /** Closed positions, most recently closed first. */
  closedPositions: Position[];
  /** Fetches the list again and merges it in; resolves when done (errors go to `error`). */
  reload: () => Promise<void>;
  /** Creates a position for this user; rejects with the server's message. */
  create: (payload: Omit<CreatePositionPayload, "userId">) => Promise<Position>;
  /** Closes one of this user's positions manually; rejects with the server's message. */
  close: (positionId: string, closePrice: number | string) => Promise<Position>;
  /** The event channel's state, for a connection indicator. */
  connection: ConnectionState;
}

interface UserPositions {
  userId: string;
  positions: readonly Position[];
}

export function useBackendPositions(options: UseBackendPositionsOptions): BackendPositions {
  const { userId } = options;
  const [state, setState] = useState<UserPositions>({ userId, positions: [] });
  const [loading, setLoading] = useState<boolean>(Boolean(userId));
  const [error, setError] = useState<string | null>(null);
  // The user id whose answers are still wanted: a response for a previous id is dropped.
  const currentUser = useRef(userId);
  currentUser.current = userId;
  // Read at each call, so a new token (or provider) never reloads or reconnects by itself.
  const tokenRef = useRef(options.token);
  tokenRef.current = options.token;
  const auth = useCallback(
    (): RequestOptions | undefined =>
      tokenRef.current ? { token: tokenRef.current } : undefined,
    [],
  );

  const absorb = useCallback((forUser: string, incoming: readonly Position[]) => {
    if (forUser !== currentUser.current) return;
    setState((previous) =>
      previous.userId === forUser
        ? { userId: forUser, positions: mergePositions(previous.positions, incoming) }
        : { userId: forUser, positions: mergePositions([], incoming) },
    );
  }, []);

  const reload = useCallback(async () => {
    const forUser = currentUser.current;
    if (!forUser) return;
    try {
      const list = await listPositions(forUser, undefined, auth());
      absorb(forUser, list);
      if (forUser === currentUser.current) setError(null);
    } catch (failure) {
      if (forUser === currentUser.current) setError(messageOf(failure));
    } finally {
      if (forUser === currentUser.current) setLoading(false);
    }
  }, [absorb, auth]);

  useEffect(() => {
    setState({ userId, positions: [] });
    setError(null);
    setLoading(Boolean(userId));
    void reload();
  }, [userId, reload]);

  const onEvent = useCallback(
    (event: PositionEvent) => absorb(userId, [event.position]),
    [absorb, userId],
  );
  const onReady = useCallback(
    ({ reconnected }: { reconnected: boolean }) => {
      // On a reconnect onGap decides; the first ready always resyncs (see the module doc).
      if (!reconnected) void reload();
    },
    [reload],
  );
  const onGap = useCallback(() => void reload(), [reload]);

  const events = usePositionEvents({
    userId,
    onClosed: onEvent,
    onCreated: onEvent,
    onReady,
    onGap,
    backoff: options.backoff,
    WebSocketImpl: options.WebSocketImpl,
    token: options.token,
  });

  const create = useCallback(
    async (payload: Omit<CreatePositionPayload, "userId">) => {
      const forUser = currentUser.current;
      const created = await createPosition({ ...payload, userId: forUser }, auth());
      absorb(forUser, [created]);
      return created;
    },
    [absorb, auth],
  );

  const close = useCallback(
    async (positionId: string, closePrice: number | string) => {
      const forUser = currentUser.current;
      const closed = await closePosition(forUser, positionId, closePrice, auth());
      absorb(forUser, [closed]);
      return closed;
    },
    [absorb, auth],
  );

  // A render between a user id change and the reset effect must not show the old user's list.
  const positions = state.userId === userId ? state.positions : EMPTY;
  const lists = useMemo(
    () => ({
      positions: [...positions],
      openPositions: openOf(positions),
      closedPositions: closedOf(positions),
    }),
    [positions],
  );

  return { loading, error, ...lists, reload, create, close, connection: events.state };
}

const EMPTY: readonly Position[] = [];

function messageOf(failure: unknown): string {
  return failure instanceof Error ? failure.message : String(failure);
}
