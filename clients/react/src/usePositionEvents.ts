/**
 * `usePositionEvents`: the user's live position events from tickguard's `/ws` channel.
 *
 * Connects to `backendWsUrl(userId)`, calls `onClosed` / `onCreated` for each event, reconnects
 * with jittered exponential backoff after any close (except 1008: a rejected user id does not
 * get better by retrying), and uses each message's `seq` to tell the caller (`onGap`) when it
 * may have missed events, e.g. while it was disconnected. Closes the socket on unmount or when
 * `userId` changes; never throws from a malformed frame.
 */

import { useEffect, useRef, useState } from "react";
import { type BackoffOptions, reconnectDelay } from "./backoff";
import {
  classifyEventSeq,
  type ConnectionReadyMessage,
  type PositionClosedEvent,
  type PositionCreatedEvent,
  parseServerMessage,
} from "./events";
import { backendWsUrl, resolveToken, type TokenSource } from "./positionsApi";

/** `idle`: no user id; `connecting`: first attempt; `reconnecting`: waiting or retrying after a close. */
export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export interface ReadyInfo {
  /** The user's latest event number when this session joined (null on the old backend). */
  seq: number | null;
  /** True on every connection after the first one for this user id. */
  reconnected: boolean;
}

export interface GapInfo {
  /** The last seq this client had seen (null: unknown). */
  lastSeq: number | null;
  /** The seq that revealed the gap (null when the server sends none). */
  seq: number | null;
}

export interface UsePositionEventsOptions {
  userId: string;
  onClosed: (event: PositionClosedEvent) => void;
  onCreated?: (event: PositionCreatedEvent) => void;
  onReady?: (ready: ReadyInfo, message: ConnectionReadyMessage) => void;
  /** Events may have been missed: reload what depends on them over REST. */
  onGap?: (gap: GapInfo) => void;
  /** Reconnect delays (defaults: 1 s doubling to 30 s, full jitter). */
  backoff?: BackoffOptions;
  /** The WebSocket class to use (default: the global one). */
  WebSocketImpl?: typeof WebSocket;
  /**
   * A bearer token (or a function giving the current one), sent as `?token=` on each connect
   * when the server authenticates. With a token, a 1008 close (an expired token) reconnects
   * with backoff and a fresh token; without one, 1008 (a rejected user id) stays closed.
   */
  token?: TokenSource;
}

export interface PositionEventsStatus {
  state: ConnectionState;
  /** Consecutive failed attempts since the last open. */
  attempt: number;
  /** The last seq seen for this user (null: none yet). */
  lastSeq: number | null;
}

/** The policy-violation close code: the server rejected the user id. */
const POLICY_VIOLATION = 1008;

export function usePositionEvents(options: UsePositionEventsOptions): PositionEventsStatus {
  const { userId } = options;
  // Callbacks live in a ref so that passing new closures each render does not reconnect.
  const latest = useRef(options);
  latest.current = options;
  const [status, setStatus] = useState<PositionEventsStatus>({
    state: userId ? "connecting" : "idle",
    attempt: 0,
    lastSeq: null,
  });

  useEffect(() => {
    if (!userId) {
      setStatus({ state: "idle", attempt: 0, lastSeq: null });
      return undefined;
    }
    const Socket = latest.current.WebSocketImpl ?? globalThis.WebSocket;
    let socket: WebSocket | null = null;
    let retryTimer: ReturnType<typeof setTimeout> | undefined;
    let stopped = false;
    let attempt = 0;
    let readies = 0;
    // Per user id, kept across reconnects: that is how a reconnect notices missed events.
    let lastSeq: number | null = null;

    const report = (state: ConnectionState) => {
      if (!stopped) setStatus({ state, attempt, lastSeq });
    };

    const onMessage = (event: MessageEvent) => {
      const message = parseServerMessage(event.data);
      if (message === null) return;
      const callbacks = latest.current;
      if (message.type === "connection.ready") {
        const seq = message.seq ?? null;
        readies += 1;
        const reconnected = readies > 1;
        // A reconnect whose starting seq moved (or is unknown) may have hidden events.
        if (reconnected && (seq === null || seq !== lastSeq)) callbacks.onGap?.({ lastSeq, seq });
        lastSeq = seq;
        report("open");
        callbacks.onReady?.({ seq, reconnected }, message);
        return;
      }
      if (message.seq !== undefined) {
        const verdict = classifyEventSeq(lastSeq, message.seq);
        if (verdict === "duplicate") return;
        if (verdict === "gap") callbacks.onGap?.({ lastSeq, seq: message.seq });
        lastSeq = message.seq;
        report("open");
      }
      if (message.type === "position.closed") callbacks.onClosed(message);
      else callbacks.onCreated?.(message);
    };

    const connect = async () => {
      retryTimer = undefined;
      let token: string | null = null;
      try {
        token = await resolveToken(latest.current.token);
      } catch {
        token = null; // the provider failed: try without, the server's close says the rest
      }
      if (stopped) return;
      const current = new Socket(backendWsUrl(userId, token));
      socket = current;
      current.onopen = () => {
        attempt = 0; // reset on open, as the earlier client did
        report("open");
      };
      current.onmessage = onMessage;
      current.onclose = (event: CloseEvent) => {
        if (stopped || socket !== current) return;
        socket = null;
        if (event.code === POLICY_VIOLATION && !latest.current.token) {
          report("closed");
          return;
        }
        const delay = reconnectDelay(attempt, latest.current.backoff);
        attempt += 1;
        report("reconnecting");
        retryTimer = setTimeout(() => void connect(), delay);
      };
      // An error is always followed by a close event, which schedules the retry.
      current.onerror = null;
    };

    setStatus({ state: "connecting", attempt: 0, lastSeq: null });
    void connect();
    return () => {
      stopped = true;
      if (retryTimer !== undefined) clearTimeout(retryTimer);
      if (socket !== null) {
        const closing = socket;
        socket = null;
        closing.onmessage = null;
        closing.onopen = null;
        // Closing a CONNECTING socket throws in some implementations: let the open finish first.
        if (closing.readyState === 0 /* CONNECTING */) closing.onopen = () => closing.close(1000);
        else closing.close(1000);
      }
    };
  }, [userId]);

  return status;
}
