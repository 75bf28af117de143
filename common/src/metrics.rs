//! Metric names, shared so dashboards, alerts and tests agree with the code.
//!
//! Naming: `chat_<subsystem>_<name>_<unit>`; counters end in `_total`, durations in
//! `_seconds`. Labels are low-cardinality (a reason, a kind, a code), never a room or user.

pub const CONNECTIONS: &str = "chat_node_connections";
pub const CONNECTIONS_OPENED: &str = "chat_node_connections_opened_total";
/// Label `reason`: the close code's name (`CloseCode::as_str`) when the node closed it,
/// `client_closed` when the client closed or vanished, `upgrade_failed` when the handshake
/// did not complete.
pub const CONNECTIONS_CLOSED: &str = "chat_node_connections_closed_total";
pub const ROOMS_ACTIVE: &str = "chat_node_rooms_active";
/// Label `source`: `ws`, `http`, or `bus` (forwarded from another node).
pub const MESSAGES_RECEIVED: &str = "chat_node_messages_received_total";
pub const MESSAGES_DELIVERED: &str = "chat_node_messages_delivered_total";
pub const MESSAGES_DUPLICATE: &str = "chat_node_messages_duplicate_total";
pub const MESSAGES_REPLAYED: &str = "chat_node_messages_replayed_total";
/// Time from a room accepting a message to having enqueued it for every member.
pub const FANOUT_SECONDS: &str = "chat_node_fanout_seconds";
/// Time from a room accepting a message to the sender's ack (the store write).
pub const ACK_SECONDS: &str = "chat_node_ack_seconds";
/// Fill ratio of a member's outbound queue at enqueue time, sampled.
pub const QUEUE_FILL_RATIO: &str = "chat_node_outbound_queue_fill_ratio";
/// Sends refused because a room inbox was full.
pub const ROOM_INBOX_FULL: &str = "chat_node_room_inbox_full_total";
pub const SLOW_CONSUMER_DISCONNECTS: &str = "chat_node_slow_consumer_disconnects_total";
/// Label `kind`: an `ErrorCode::as_str` (including `rate_limited` for refused sends), or
/// `protocol_error` for WebSocket-level violations.
pub const BAD_INPUT: &str = "chat_node_bad_input_total";
/// Label `op`: `append` or `read`.
pub const STORE_ERRORS: &str = "chat_node_store_errors_total";
pub const STORE_WRITE_SECONDS: &str = "chat_node_store_write_seconds";
/// History reads answered by sharing an identical read already in flight.
pub const STORE_READS_COALESCED: &str = "chat_node_store_reads_coalesced_total";
pub const STORE_PENDING: &str = "chat_node_store_pending_messages";
pub const HTTP_REQUESTS: &str = "chat_node_http_requests_total";
pub const READY: &str = "chat_node_ready";
/// 1 while this node's bus inbox subscription is live (gauge).
pub const BUS_UP: &str = "chat_node_bus_up";
/// PUBLISH commands this node sent on the bus (requests, replies and link batches).
pub const BUS_PUBLISHED: &str = "chat_node_bus_published_total";
/// Payload bytes of those PUBLISH commands.
pub const BUS_PUBLISHED_BYTES: &str = "chat_node_bus_published_bytes_total";
/// Items per link batch: how much one PUBLISH carries to a peer node (histogram).
pub const BUS_BATCH_ITEMS: &str = "chat_node_bus_batch_items";
/// Messages this node received on its bus inbox.
pub const BUS_RECEIVED: &str = "chat_node_bus_received_total";
/// Bus failures. Label `kind`: `publish`, `timeout` (no reply in time), `decode`, `gap`
/// (a peer's link batch was lost; what was bridged with it is reset).
pub const BUS_ERRORS: &str = "chat_node_bus_errors_total";
/// Times the bus subscription was restored after Redis went away.
pub const BUS_RECONNECTS: &str = "chat_node_bus_reconnects_total";
/// Round trip of a send forwarded to the room's owner, until its reply (or the timeout).
pub const CROSS_SHARD_SECONDS: &str = "chat_node_cross_shard_seconds";
/// Remote connections bridged into this node's rooms (owner side, gauge).
pub const BRIDGE_PROXIES: &str = "chat_node_bridge_proxies";
/// Room memberships of this node's connections in rooms owned elsewhere (gauge).
pub const BRIDGED_ROOMS: &str = "chat_node_bridged_rooms";
/// Resets of what is bridged with a peer node (its members here dropped, connections
/// bridged to it closed with 4002). Label `reason`: `gap`, `overflow`, `publish`,
/// `unheard`, `unsubscribed`, `peer` (the peer asked), `restarted`.
pub const BRIDGE_RESETS: &str = "chat_node_bridge_resets_total";
/// Bridged members of a room that moved to another node. Label `outcome`: `rejoined` (their
/// node joined them to the new owner from their last message, the connection stays open),
/// `closed` (4001: the room came to their own node, or the move could not be made).
pub const BRIDGE_MOVES: &str = "chat_node_bridge_moves_total";
/// Commands a room refused, or acks it withheld, because this node's lease was gone (the
/// node was paused, cut off from Redis, or its registration vanished). Label `op`: `send`,
/// `join`, `ack`, `persist`.
pub const FENCED: &str = "chat_node_fenced_total";
/// Times this node's lease lapsed; it then closes its rooms and registers anew.
pub const LEASE_LOST: &str = "chat_node_lease_lost_total";
/// Time a room waited before this node could serve it (the previous owner letting go).
pub const ROOM_ACQUIRE_SECONDS: &str = "chat_node_room_acquire_seconds";
/// Rooms this node could not take up. Label `reason`: `moved` (another node owns it now),
/// `unavailable` (no lease, or the previous owner did not let go in time).
pub const ROOM_ACQUIRE_REFUSED: &str = "chat_node_room_acquire_refused_total";
/// 1 while every member has applied this node's current ring and no departed member's
/// rooms are still waiting out its lease (gauge).
pub const OWNERSHIP_SETTLED: &str = "chat_node_ownership_settled";

// Webhooks (`--webhook-url`).
/// Messages the app's endpoint took (a 2xx answer), first time or retried.
pub const WEBHOOK_DELIVERED: &str = "chat_node_webhook_delivered_total";
/// Failed attempts that will be retried. Label `kind`: `status` (a non-2xx answer),
/// `timeout`, `connect` (refused, unreachable, closed).
pub const WEBHOOK_RETRIES: &str = "chat_node_webhook_retries_total";
/// Messages that ran out of attempts or age and went to the dead-letter table.
pub const WEBHOOK_DEAD_LETTERED: &str = "chat_node_webhook_dead_lettered_total";
/// Rooms of this node whose delivery is behind their stored head (gauge).
pub const WEBHOOK_ROOMS_BEHIND: &str = "chat_node_webhook_rooms_behind";
/// Messages read from the store for delivery and not delivered yet (gauge).
pub const WEBHOOK_QUEUE: &str = "chat_node_webhook_queue_messages";
/// From a message being stamped to the endpoint taking it (histogram).
pub const WEBHOOK_DELIVERY_SECONDS: &str = "chat_node_webhook_delivery_seconds";
/// Users marked online in Redis by this node (gauge).
pub const PRESENCE_USERS: &str = "chat_node_presence_users";

// ---------------------------------------------------------------------------------------
// chat-router. Labels: `route` is one of `ws`, `messages`, `room_api`, `owner`, `healthz`,
// `readyz`, `metrics`, `other`; `status` a class (`2xx`..`5xx`).
// ---------------------------------------------------------------------------------------

/// WebSocket connections being spliced to a node now (gauge).
pub const ROUTER_WS_CONNECTIONS: &str = "chat_router_ws_connections";
/// WebSocket connections whose upgrade the owner accepted and the router spliced.
pub const ROUTER_WS_CONNECTIONS_OPENED: &str = "chat_router_ws_connections_opened_total";
/// Requests answered, by `route` and `status` class (a `/ws` redirect counts as `3xx`, a
/// proxied upgrade as `1xx`).
pub const ROUTER_HTTP_REQUESTS: &str = "chat_router_http_requests_total";
/// Time from a request's arrival to its response head (for `/ws`: to the owner's `101`).
/// Label `route`.
pub const ROUTER_REQUEST_SECONDS: &str = "chat_router_request_seconds";
/// Bytes copied through WebSocket splices. Label `direction`: `client_to_node` or
/// `node_to_client`.
pub const ROUTER_PROXIED_BYTES: &str = "chat_router_proxied_bytes_total";
/// Failed exchanges with an owner. Label `kind`: `connect` (refused, unreachable),
/// `timeout` (connect or answer too slow), `protocol` (closed mid-answer, not HTTP).
pub const ROUTER_UPSTREAM_ERRORS: &str = "chat_router_upstream_errors_total";
/// Live nodes in the router's ring (gauge).
pub const ROUTER_RING_NODES: &str = "chat_router_ring_nodes";
/// The ring's version digest as a float (gauge): equal on routers that agree, so
/// `count(count by (value) ...)`-style checks can spot a router with a stale view.
pub const ROUTER_RING_VERSION: &str = "chat_router_ring_version";
/// Ring changes this router has seen.
pub const ROUTER_RING_CHANGES: &str = "chat_router_ring_changes_total";
/// 1 when the router's `/readyz` answers 200 (gauge).
pub const ROUTER_READY: &str = "chat_router_ready";
