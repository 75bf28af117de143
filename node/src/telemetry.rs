//! What the node counts: the description of every node metric, and the series alerts and
//! the dashboard read, created at zero at start-up. The recorder itself (process-global,
//! shared with any other server in the process) is `chat_server::telemetry`.

use common::metrics as m;
use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Describes the node's metrics and creates the series that must exist from start-up.
pub fn describe_all() {
    describe();
    describe_ownership();
    describe_hooks();
    register_zeroes();
}

fn describe() {
    describe_gauge!(m::CONNECTIONS, "Open WebSocket connections.");
    describe_counter!(m::CONNECTIONS_OPENED, "WebSocket connections accepted.");
    describe_counter!(
        m::CONNECTIONS_CLOSED,
        "WebSocket connections closed, by reason."
    );
    describe_gauge!(
        m::ROOMS_ACTIVE,
        "Rooms with a live owner task on this node."
    );
    describe_counter!(
        m::MESSAGES_RECEIVED,
        "Messages accepted by rooms, by source."
    );
    describe_counter!(m::MESSAGES_DELIVERED, "Message frames enqueued to members.");
    describe_counter!(
        m::MESSAGES_DUPLICATE,
        "Sends recognised as retries of a known cid."
    );
    describe_counter!(
        m::MESSAGES_REPLAYED,
        "Messages replayed to members joining with since."
    );
    describe_histogram!(
        m::FANOUT_SECONDS,
        Unit::Seconds,
        "Accept to enqueued for every member."
    );
    describe_histogram!(
        m::ACK_SECONDS,
        Unit::Seconds,
        "Accept to ack (durable in the store)."
    );
    describe_histogram!(
        m::QUEUE_FILL_RATIO,
        "Outbound queue fill when a broadcast enqueues."
    );
    describe_counter!(
        m::ROOM_INBOX_FULL,
        "Commands refused because a room inbox was full."
    );
    describe_counter!(
        m::SLOW_CONSUMER_DISCONNECTS,
        "Clients closed for a full outbound queue."
    );
    describe_counter!(m::BAD_INPUT, "Bad input rejected, by kind.");
    describe_counter!(m::STORE_ERRORS, "Failed or timed-out store calls, by op.");
    describe_histogram!(
        m::STORE_WRITE_SECONDS,
        Unit::Seconds,
        "Duration of store batch writes."
    );
    describe_counter!(
        m::STORE_READS_COALESCED,
        "History reads answered by an identical read in flight."
    );
    describe_gauge!(m::STORE_PENDING, "Messages accepted but not yet durable.");
    describe_counter!(
        m::HTTP_REQUESTS,
        "HTTP requests, by route and status class."
    );
    describe_gauge!(m::READY, "1 when /readyz answers 200.");
    describe_gauge!(
        m::BRIDGE_PROXIES,
        "Remote connections bridged into this node's rooms."
    );
    describe_gauge!(
        m::BRIDGED_ROOMS,
        "Memberships of local connections in rooms owned elsewhere."
    );
    describe_gauge!(m::BUS_UP, "1 while the bus inbox subscription is live.");
    describe_counter!(
        m::BUS_PUBLISHED,
        "PUBLISH commands sent on the bus (requests, replies, link batches)."
    );
    describe_counter!(
        m::BUS_PUBLISHED_BYTES,
        Unit::Bytes,
        "Payload bytes of the bus PUBLISH commands."
    );
    describe_histogram!(
        m::BUS_BATCH_ITEMS,
        "Items per link batch published to a peer node."
    );
    describe_counter!(
        m::BRIDGE_MOVES,
        "Bridged members of a moved room, rejoined on the new owner or closed."
    );
    describe_counter!(
        m::BRIDGE_RESETS,
        "Resets of what is bridged with a peer node, by reason."
    );
    describe_counter!(
        m::BUS_RECEIVED,
        "Bus messages received on this node's inbox."
    );
    describe_counter!(m::BUS_ERRORS, "Bus failures, by kind.");
    describe_counter!(
        m::BUS_RECONNECTS,
        "Bus subscriptions restored after Redis went away."
    );
    describe_histogram!(
        m::CROSS_SHARD_SECONDS,
        Unit::Seconds,
        "Forwarded send round trip to the owner."
    );
}

fn describe_ownership() {
    describe_counter!(
        m::FENCED,
        "Commands refused and acks withheld because the lease was gone, by op."
    );
    describe_counter!(m::LEASE_LOST, "Times this node's lease lapsed.");
    describe_histogram!(
        m::ROOM_ACQUIRE_SECONDS,
        Unit::Seconds,
        "Time a room waited for its previous owner to let go."
    );
    describe_counter!(
        m::ROOM_ACQUIRE_REFUSED,
        "Rooms this node could not take up, by reason."
    );
    describe_gauge!(
        m::OWNERSHIP_SETTLED,
        "1 while every member has applied this node's ring."
    );
}

fn describe_hooks() {
    describe_counter!(
        m::WEBHOOK_DELIVERED,
        "Messages the webhook endpoint took (2xx)."
    );
    describe_counter!(
        m::WEBHOOK_RETRIES,
        "Failed webhook attempts that will be retried, by kind."
    );
    describe_counter!(
        m::WEBHOOK_DEAD_LETTERED,
        "Messages moved to the dead-letter table."
    );
    describe_gauge!(
        m::WEBHOOK_ROOMS_BEHIND,
        "Rooms whose webhook delivery is behind their stored head."
    );
    describe_gauge!(
        m::WEBHOOK_QUEUE,
        "Messages read for webhook delivery and not delivered yet."
    );
    describe_histogram!(
        m::WEBHOOK_DELIVERY_SECONDS,
        Unit::Seconds,
        "From a message's timestamp to the webhook endpoint taking it."
    );
    describe_gauge!(m::PRESENCE_USERS, "Users this node marks online in Redis.");
}

/// Creates, at zero, every series an alert or the dashboard reads that would otherwise only
/// appear with its first event: `rate()` needs two samples, so an alert on the first
/// store error of a fresh series would never fire, and a dashboard panel of a missing
/// series is indistinguishable from a renamed metric. Labelled counters get every label
/// value the code can emit.
fn register_zeroes() {
    use common::ErrorCode;
    for name in [
        m::SLOW_CONSUMER_DISCONNECTS,
        m::ROOM_INBOX_FULL,
        m::MESSAGES_DUPLICATE,
        m::MESSAGES_REPLAYED,
        m::STORE_READS_COALESCED,
        m::BUS_RECONNECTS,
        m::BUS_PUBLISHED,
        m::BUS_PUBLISHED_BYTES,
        m::WEBHOOK_DELIVERED,
        m::WEBHOOK_DEAD_LETTERED,
    ] {
        metrics::counter!(name).increment(0);
    }
    for kind in ["status", "timeout", "connect"] {
        metrics::counter!(m::WEBHOOK_RETRIES, "kind" => kind).increment(0);
    }
    for reason in [
        "gap",
        "overflow",
        "publish",
        "unheard",
        "unsubscribed",
        "peer",
        "restarted",
    ] {
        metrics::counter!(m::BRIDGE_RESETS, "reason" => reason).increment(0);
    }
    for outcome in ["rejoined", "closed"] {
        metrics::counter!(m::BRIDGE_MOVES, "outcome" => outcome).increment(0);
    }
    for op in ["append", "read", "fence"] {
        metrics::counter!(m::STORE_ERRORS, "op" => op).increment(0);
    }
    for op in ["send", "join", "ack", "persist"] {
        metrics::counter!(m::FENCED, "op" => op).increment(0);
    }
    for reason in ["moved", "unavailable"] {
        metrics::counter!(m::ROOM_ACQUIRE_REFUSED, "reason" => reason).increment(0);
    }
    metrics::counter!(m::LEASE_LOST).increment(0);
    metrics::gauge!(m::OWNERSHIP_SETTLED).increment(0.0);
    for kind in ["publish", "timeout", "decode", "gap"] {
        metrics::counter!(m::BUS_ERRORS, "kind" => kind).increment(0);
    }
    for code in ErrorCode::ALL {
        metrics::counter!(m::BAD_INPUT, "kind" => code.as_str()).increment(0);
    }
    metrics::counter!(m::BAD_INPUT, "kind" => "protocol_error").increment(0);
    for name in [
        m::BRIDGE_PROXIES,
        m::BRIDGED_ROOMS,
        m::STORE_PENDING,
        m::WEBHOOK_ROOMS_BEHIND,
        m::WEBHOOK_QUEUE,
        m::PRESENCE_USERS,
    ] {
        metrics::gauge!(name).increment(0.0);
    }
    for name in [
        m::QUEUE_FILL_RATIO,
        m::FANOUT_SECONDS,
        m::ACK_SECONDS,
        m::STORE_WRITE_SECONDS,
        m::CROSS_SHARD_SECONDS,
        m::ROOM_ACQUIRE_SECONDS,
        m::WEBHOOK_DELIVERY_SECONDS,
    ] {
        // Registers the histogram; it renders with zero counts until the first sample.
        let _ = metrics::histogram!(name);
    }
}
