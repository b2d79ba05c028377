/** @tickguard/react: the typed REST client and the React hooks for tickguard. */

export { type BackoffOptions, reconnectDelay } from "./backoff";
export {
  type ConnectionReadyMessage,
  classifyEventSeq,
  type EventSource,
  type PositionClosedEvent,
  type PositionCreatedEvent,
  type PositionEvent,
  parseServerMessage,
  type SeqVerdict,
  type ServerMessage,
} from "./events";
export {
  API_BASE_URL,
  backendWsUrl,
  type CloseReason,
  type CreatePositionPayload,
  closePosition,
  createPosition,
  getPosition,
  listClosedPositions,
  listPositions,
  type Position,
  type PositionSide,
  type PositionStatus,
  type RequestOptions,
  resolveToken,
  type TokenSource,
} from "./positionsApi";
export { closedOf, compareNewestFirst, isNewer, mergePositions, openOf } from "./positionsState";
export {
  type BackendPositions,
  type UseBackendPositionsOptions,
  useBackendPositions,
} from "./useBackendPositions";
export {
  type ConnectionState,
  type GapInfo,
  type PositionEventsStatus,
  type ReadyInfo,
  type UsePositionEventsOptions,
  usePositionEvents,
} from "./usePositionEvents";
