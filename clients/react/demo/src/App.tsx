import {
  type ConnectionState,
  type Position,
  type PositionSide,
  useBackendPositions,
} from "@tickguard/react";
import { type FormEvent, useState } from "react";
import type { DemoSettings } from "./settings";
import { type FeedState, type Tick, useTickerPrices } from "./useTickerPrices";

/** The dashboard: one user's positions on tickguard, with live prices from the feed. */
export function App({ settings }: { settings: DemoSettings }) {
  const [userId, setUserId] = useState(settings.userId);
  const feed = useTickerPrices(settings.feedUrl, settings.products);
  const backend = useBackendPositions({ userId });

  return (
    <main>
      <header>
        <h1>tickguard</h1>
        <StateBadge label="backend" state={userId ? backend.connection : "idle"} />
        <StateBadge label="feed" state={feed.state} />
      </header>
      <UserForm userId={userId} onChange={setUserId} />
      <PriceBoard products={settings.products} prices={feed.prices} feedUrl={settings.feedUrl} problem={feed.problem} />
      {userId ? (
        <>
          <OpenForm products={settings.products} prices={feed.prices} create={backend.create} />
          {backend.error && <p className="error" role="alert">{backend.error}</p>}
          <OpenTable
            positions={backend.openPositions}
            prices={feed.prices}
            loading={backend.loading}
            close={backend.close}
          />
          <ClosedTable positions={backend.closedPositions} />
        </>
      ) : (
        <p className="hint">Enter a user id to see and open positions.</p>
      )}
    </main>
  );
}

function StateBadge({ label, state }: { label: string; state: ConnectionState | FeedState }) {
  return (
    <span className={`badge badge-${state}`} data-testid={`${label}-state`} data-state={state}>
      {label}: {state}
    </span>
  );
}

function UserForm({ userId, onChange }: { userId: string; onChange: (id: string) => void }) {
  const [draft, setDraft] = useState(userId);
  const submit = (event: FormEvent) => {
    event.preventDefault();
    onChange(draft.trim());
  };
  return (
    <form className="user" onSubmit={submit}>
      <label>
        User id <input value={draft} onChange={(event) => setDraft(event.target.value)} placeholder="alice" />
      </label>
      <button type="submit">Use</button>
      {userId && <span className="current">showing <strong>{userId}</strong></span>}
    </form>
  );
}

function PriceBoard(props: {
  products: string[];
  prices: Record<string, Tick>;
  feedUrl: string;
  problem: string | null;
}) {
  return (
    <section>
      <h2>Prices <small>{props.feedUrl}</small></h2>
      <div className="prices">
        {props.products.map((product) => (
          <div key={product} className="price" data-testid={`price-${product}`}>
            <span>{product}</span>
            <strong>{props.prices[product]?.price ?? "—"}</strong>
          </div>
        ))}
      </div>
      {props.problem && <p className="error">{props.problem}</p>}
    </section>
  );
}

function OpenForm(props: {
  products: string[];
  prices: Record<string, Tick>;
  create: ReturnType<typeof useBackendPositions>["create"];
}) {
  const [symbol, setSymbol] = useState(props.products[0] ?? "");
  const [side, setSide] = useState<PositionSide>("long");
  const [entryPrice, setEntryPrice] = useState("");
  const [takeProfit, setTakeProfit] = useState("");
  const [stopLoss, setStopLoss] = useState("");
  const [message, setMessage] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  const submit = async (event: FormEvent) => {
    event.preventDefault();
    setBusy(true);
    setMessage(null);
    try {
      // Prices go as the strings typed: the server parses them exactly.
      await props.create({
        symbol,
        side,
        ...(entryPrice.trim() ? { entryPrice: entryPrice.trim() } : {}),
        takeProfit: takeProfit.trim() || null,
        stopLoss: stopLoss.trim() || null,
      });
      setTakeProfit("");
      setStopLoss("");
    } catch (failure) {
      setMessage(failure instanceof Error ? failure.message : String(failure));
    } finally {
      setBusy(false);
    }
  };

  return (
    <section>
      <h2>Open a position</h2>
      <form className="open" onSubmit={submit}>
        <label>
          Symbol
          <select value={symbol} onChange={(event) => setSymbol(event.target.value)}>
            {props.products.map((product) => (
              <option key={product}>{product}</option>
            ))}
          </select>
        </label>
        <label>
          Side
          <select value={side} onChange={(event) => setSide(event.target.value as PositionSide)}>
            <option value="long">long</option>
            <option value="short">short</option>
          </select>
        </label>
        <label>
          Entry price
          <input
            value={entryPrice}
            onChange={(event) => setEntryPrice(event.target.value)}
            placeholder={props.prices[symbol]?.price ?? "market"}
            inputMode="decimal"
          />
        </label>
        <label>
          Take profit
          <input value={takeProfit} onChange={(event) => setTakeProfit(event.target.value)} inputMode="decimal" />
        </label>
        <label>
          Stop loss
          <input value={stopLoss} onChange={(event) => setStopLoss(event.target.value)} inputMode="decimal" />
        </label>
        <button type="submit" disabled={busy}>
          Open {side}
        </button>
      </form>
      {message && <p className="error" role="alert">{message}</p>}
    </section>
  );
}

function OpenTable(props: {
  positions: Position[];
  prices: Record<string, Tick>;
  loading: boolean;
  close: ReturnType<typeof useBackendPositions>["close"];
}) {
  const [message, setMessage] = useState<string | null>(null);
  const closeAtMarket = async (position: Position) => {
    const price = props.prices[position.symbol]?.price;
    if (price === undefined) return;
    setMessage(null);
    try {
      await props.close(position.id, price);
    } catch (failure) {
      setMessage(failure instanceof Error ? failure.message : String(failure));
    }
  };
  return (
    <section>
      <h2>Open positions {props.loading && <small>loading…</small>}</h2>
      {message && <p className="error" role="alert">{message}</p>}
      <table data-testid="open-positions">
        <thead>
          <tr>
            <th>Symbol</th><th>Side</th><th>Entry</th><th>Take profit</th><th>Stop loss</th><th>Last</th><th>Opened</th><th />
          </tr>
        </thead>
        <tbody>
          {props.positions.map((position) => {
            const last = props.prices[position.symbol]?.price;
            return (
              <tr key={position.id} data-position-id={position.id}>
                <td>{position.symbol}</td>
                <td className={position.side}>{position.side}</td>
                <td>{position.entryPrice}</td>
                <td>{position.takeProfit ?? "—"}</td>
                <td>{position.stopLoss ?? "—"}</td>
                <td>{last ?? "—"}</td>
                <td>{time(position.createdAt)}</td>
                <td>
                  <button type="button" disabled={last === undefined} onClick={() => void closeAtMarket(position)}>
                    Close
                  </button>
                </td>
              </tr>
            );
          })}
          {props.positions.length === 0 && (
            <tr><td colSpan={8} className="empty">No open positions</td></tr>
          )}
        </tbody>
      </table>
    </section>
  );
}

function ClosedTable({ positions }: { positions: Position[] }) {
  return (
    <section>
      <h2>Closed positions</h2>
      <table data-testid="closed-positions">
        <thead>
          <tr>
            <th>Symbol</th><th>Side</th><th>Entry</th><th>Close</th><th>Reason</th><th>Closed</th>
          </tr>
        </thead>
        <tbody>
          {positions.map((position) => (
            <tr key={position.id} data-position-id={position.id}>
              <td>{position.symbol}</td>
              <td className={position.side}>{position.side}</td>
              <td>{position.entryPrice}</td>
              <td>{position.closePrice}</td>
              <td className="reason">{position.closeReason}</td>
              <td>{position.closedAt ? time(position.closedAt) : "—"}</td>
            </tr>
          ))}
          {positions.length === 0 && (
            <tr><td colSpan={6} className="empty">No closed positions</td></tr>
          )}
        </tbody>
      </table>
    </section>
  );
}

/** An ISO timestamp as the viewer's local time of day. */
function time(iso: string): string {
  return new Date(iso).toLocaleTimeString();
}
