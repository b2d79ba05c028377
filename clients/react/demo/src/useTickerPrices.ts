/**
 * Live last-trade prices from a Coinbase-protocol feed (Coinbase itself or `tickguard sim`),
 * the way the real app gets them: the browser subscribes to the `ticker` channel directly.
 * Prices stay strings (Coinbase sends them as decimal strings): they are shown and sent back
 * to tickguard as they are, never through a float.
 */

import { reconnectDelay } from "@tickguard/react";
import { useEffect, useState } from "react";

export type FeedState = "connecting" | "live" | "reconnecting";

export interface Tick {
  price: string;
  time: string;
}

export interface TickerPrices {
  state: FeedState;
  prices: Record<string, Tick>;
  /** The feed's last `error` reason (e.g. an unknown product), if any. */
  problem: string | null;
}

export function useTickerPrices(feedUrl: string, products: readonly string[]): TickerPrices {
  const [state, setState] = useState<FeedState>("connecting");
  const [prices, setPrices] = useState<Record<string, Tick>>({});
  const [problem, setProblem] = useState<string | null>(null);
  const productKey = products.join(",");

  useEffect(() => {
    const ids = productKey.split(",").filter(Boolean);
    let socket: WebSocket | null = null;
    let timer: ReturnType<typeof setTimeout> | undefined;
    let attempt = 0;
    let stopped = false;

    const connect = () => {
      const current = new WebSocket(feedUrl);
      socket = current;
      current.onopen = () => {
        attempt = 0;
        // One product per subscribe: Coinbase ignores a whole message that names one bad product.
        for (const id of ids) {
          current.send(
            JSON.stringify({ type: "subscribe", channels: [{ name: "ticker", product_ids: [id] }] }),
          );
        }
      };
      current.onmessage = (event: MessageEvent) => {
        let message: { type?: string; product_id?: string; price?: string; time?: string; reason?: string };
        try {
          message = JSON.parse(String(event.data));
        } catch {
          return; // a malformed frame is skipped, not fatal
        }
        if (message.type === "ticker" && message.product_id && message.price) {
          const tick = { price: message.price, time: message.time ?? "" };
          const product = message.product_id;
          setState("live");
          setPrices((previous) => ({ ...previous, [product]: tick }));
        } else if (message.type === "error") {
          setProblem(message.reason ?? "feed error");
        }
      };
      current.onclose = () => {
        if (stopped) return;
        setState("reconnecting");
        timer = setTimeout(connect, reconnectDelay(attempt));
        attempt += 1;
      };
    };

    setState("connecting");
    connect();
    return () => {
      stopped = true;
      if (timer !== undefined) clearTimeout(timer);
      socket?.close();
    };
  }, [feedUrl, productKey]);

  return { state, prices, problem };
}
