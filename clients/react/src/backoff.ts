/**
 * Reconnect delays: exponential backoff with full jitter. The earlier client waited exactly
 * `min(1000 * 2^attempt, 30000)` ms, so every tab of every user came back in the same second
 * after a server restart; full jitter spreads them over the whole window instead.
 */

export interface BackoffOptions {
  /** Delay cap of the first retry, in ms (default 1000). */
  baseMs?: number;
  /** Largest delay, in ms (default 30000). */
  maxMs?: number;
  /** Source of jitter in [0, 1) (default Math.random). */
  random?: () => number;
}

/** The delay before retry number `attempt` (0 for the first): uniform in [0, min(base·2^attempt, max)]. */
export function reconnectDelay(attempt: number, options: BackoffOptions = {}): number {
  const { baseMs = 1000, maxMs = 30000, random = Math.random } = options;
  // 2^attempt overflows to Infinity for large attempts; min() caps it either way.
  const ceiling = Math.min(baseMs * 2 ** attempt, maxMs);
  return Math.floor(random() * ceiling);
}
