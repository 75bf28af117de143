// @chat-cluster/client: the TypeScript client of the chat cluster (common/PROTOCOL.md).
export {
  ChatClient,
  ChatError,
  type Ack,
  type ChatMessage,
  type ClientEvents,
  type ClientOptions,
  type PresenceEvent,
  type State,
  type WebSocketConstructor,
  type WebSocketLike,
} from "./client.js";
export { CLOSE_CODES, ERROR_CODES, closeName, closeRetry, errorRetry, type ErrorCode, type Retry } from "./codes.js";
export { compareIds, isMessageId, type MessageId } from "./ids.js";
