/**
 * The demo's settings: where live prices come from and which products it shows. Each comes
 * from the page's query string first (`?feed=ws://…&products=BTC-USD,ETH-USD&user=alice`), then
 * the build's environment (VITE_FEED_URL, VITE_PRODUCTS), then a default: the local simulator.
 */

export interface DemoSettings {
  /** A Coinbase-protocol WebSocket feed: `tickguard sim` or wss://ws-feed.exchange.coinbase.com. */
  feedUrl: string;
  products: string[];
  /** The user id to start with (empty: ask). */
  userId: string;
}

const DEFAULT_FEED_URL = "ws://127.0.0.1:8765"; // `tickguard sim`'s default port
const DEFAULT_PRODUCTS = "BTC-USD,ETH-USD";

export function settingsFromLocation(location: Location): DemoSettings {
  const query = new URLSearchParams(location.search);
  const products = query.get("products") ?? import.meta.env.VITE_PRODUCTS ?? DEFAULT_PRODUCTS;
  return {
    feedUrl: query.get("feed") ?? import.meta.env.VITE_FEED_URL ?? DEFAULT_FEED_URL,
    products: products
      .split(",")
      .map((product: string) => product.trim().toUpperCase())
      .filter(Boolean),
    userId: query.get("user") ?? "",
  };
}
