export const clientRoot: string;
export const artifactsDir: string;
export function freePort(): Promise<number>;
export interface Stack {
  apiBaseUrl: string;
  simUrl: string;
  simControlUrl: string;
  publish(product: string, price: string | number): Promise<void>;
  stop(): Promise<void>;
}
export function startStack(options?: {
  products?: string;
  path?: "walk" | "script";
  corsOrigin?: string;
  label?: string;
}): Promise<Stack>;
