import { inject } from "vitest";

/** A user id no other test uses, so tests sharing one server never see each other's events. */
export function freshUser(label: string): string {
  return `${label}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
}

/** Makes the simulator trade `product` at `price` now. */
export async function publish(product: string, price: string): Promise<void> {
  const response = await fetch(inject("simControlUrl"), {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ op: "publish", product, price }),
  });
  if (!response.ok) throw new Error(`sim publish: HTTP ${response.status}`);
}
