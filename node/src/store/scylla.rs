//! The production message store: ScyllaDB (or Apache Cassandra) over CQL.
//!
//! Layout, the one ScyllaDB users run at trillions of messages: `messages` is partitioned
//! by `(room, bucket)` — `bucket` is the start of the message id's time window, in Unix ms,
//! of `--cql-bucket` width — and clustered by `id DESC`. `room_buckets` lists the non-empty
//! buckets of each room, so history pages walk from bucket to bucket in either direction
//! without probing empty windows. Writes are one unlogged batch per partition (a room's
//! batch almost always falls in one bucket), prepared, idempotent, at the configured
//! consistency, with a bound on batches in flight. Identical concurrent reads of one room
//! share one query. The same CQL runs unchanged on ScyllaDB and Cassandra 5.
//!
//! Fencing: every message write carries a client-side timestamp from this process's
//! clock, strictly increasing, and a node taking a room over deletes the id range above
//! the room's head, for the buckets a late write could fall in, with a range tombstone at
//! a newer timestamp. A write an earlier owner had on its way when its lease ended has an
//! older timestamp, so it is shadowed whenever it lands, on ScyllaDB and Cassandra alike;
//! what this node writes afterwards is newer and stays. The rule assumes node clocks agree
//! within the time between the old owner's last write and the takeover (at least the
//! store timeout), as NTP keeps them.
//!
//! Client-message-id dedupe needs no table of its own: rows carry `sender` and `cid`, and a
//! room reloads the ids of its dedupe window from here when it starts on a node. The
//! readiness probe is a one-row write into `meta` at the configured consistency, so
//! readiness fails exactly when message writes would.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use common::{metrics as m, ChatMessage, ClientMsgId, MessageId, RoomId, UserId};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use tokio::sync::{oneshot, Semaphore};

use super::{
    Cause, DeadLetter, HistoryQuery, HookCursor, MessageStore, PageFrom, RoomState, StoreError,
    StoreFuture, WriteGuard,
};

/// Buckets fetched from the index per query while walking history.
const BUCKET_PAGE: i32 = 16;
/// Rows fetched per message query; longer pages take several.
const ROW_PAGE: usize = 1000;
/// Payload bytes per CQL batch, at most (a single larger message goes alone).
const BATCH_BYTES: usize = 40 * 1024;
/// `(room, bucket)` pairs remembered as already indexed, before the set is reset.
const KNOWN_BUCKETS_MAX: usize = 100_000;
/// Most buckets one fence covers (the window is minutes; buckets are at least a minute).
const FENCE_BUCKETS_MAX: i64 = 64;

/// Connection and schema settings for [`ScyllaStore::connect`].
#[derive(Debug, Clone)]
pub struct ScyllaConfig {
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// The CQL replication map, e.g. `{'class': 'SimpleStrategy', 'replication_factor': 1}`.
    pub replication: String,
    pub consistency: Consistency,
    pub bucket: Duration,
    pub max_inflight: usize,
    pub request_timeout: Duration,
    /// How long messages are kept (a CQL TTL on each row); zero keeps them for good.
    pub message_ttl: Duration,
}

/// One schema version: its statements are idempotent (`IF NOT EXISTS`), so nodes starting
/// at once may all apply it.
struct Migration {
    version: i32,
    description: &'static str,
    statements: &'static [&'static str],
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "messages by (room, bucket), room bucket index, meta",
        statements: &[
            "CREATE TABLE IF NOT EXISTS {ks}.messages (
                room text, bucket bigint, id bigint, sender text, cid text, body text, ts bigint,
                PRIMARY KEY ((room, bucket), id)
            ) WITH CLUSTERING ORDER BY (id DESC)",
            "CREATE TABLE IF NOT EXISTS {ks}.room_buckets (
                room text, bucket bigint,
                PRIMARY KEY (room, bucket)
            ) WITH CLUSTERING ORDER BY (bucket DESC)",
            "CREATE TABLE IF NOT EXISTS {ks}.meta (key text PRIMARY KEY, value text)",
        ],
    },
    Migration {
        version: 2,
        description: "room lifecycle, webhook cursors, dead letters",
        statements: &[
            "CREATE TABLE IF NOT EXISTS {ks}.rooms (
                room text PRIMARY KEY, ended_at bigint, expires_at bigint
            )",
            // A row per room whose deliveries may be behind; deleted once caught up, so a
            // scan of the table lists the rooms with work pending.
            "CREATE TABLE IF NOT EXISTS {ks}.hook_cursors (
                room text PRIMARY KEY, delivered bigint, attempts int, last_error text
            )",
            "CREATE TABLE IF NOT EXISTS {ks}.dead_letters (
                room text, id bigint, sender text, cid text, body text, ts bigint,
                attempts int, last_error text, dead_at bigint,
                PRIMARY KEY (room, id)
            )",
        ],
    },
];

/// The columns of a dead letter, in the order [`dead_letter_row`] reads them.
const DEAD_COLS: &str = "room, id, sender, cid, body, ts, attempts, last_error, dead_at";
type DeadRow = (String, i64, String, String, String, i64, i32, String, i64);

fn dead_letter_row(row: DeadRow) -> Result<DeadLetter, StoreError> {
    let (room, id, sender, cid, body, ts, attempts, last_error, dead_at) = row;
    Ok(DeadLetter {
        message: ChatMessage {
            room: RoomId::new(room).map_err(err)?,
            id: MessageId(id as u64),
            from: UserId::new(sender).map_err(err)?,
            cid: ClientMsgId::new(cid).map_err(err)?,
            body,
            ts: ts as u64,
        },
        attempts: attempts.max(0) as u32,
        last_error,
        dead_at: dead_at as u64,
    })
}

type ReadKey = (RoomId, HistoryQuery);
type ReadResult = Result<Vec<ChatMessage>, StoreError>;

pub struct ScyllaStore {
    session: Session,
    bucket_ms: i64,
    insert_msg: PreparedStatement,
    insert_bucket: PreparedStatement,
    buckets_desc: PreparedStatement,
    buckets_asc: PreparedStatement,
    msgs_desc: PreparedStatement,
    msgs_asc: PreparedStatement,
    probe: PreparedStatement,
    fence_range: PreparedStatement,
    room_get: PreparedStatement,
    room_set: PreparedStatement,
    cursor_get: PreparedStatement,
    cursor_set: PreparedStatement,
    cursor_clear: PreparedStatement,
    cursor_rooms: PreparedStatement,
    dead_put: PreparedStatement,
    dead_of_room: PreparedStatement,
    dead_all: PreparedStatement,
    dead_one: PreparedStatement,
    dead_delete: PreparedStatement,
    /// Seconds; 0 is no TTL.
    message_ttl: i32,
    consistency: Consistency,
    /// The last write timestamp used (µs): writes are strictly increasing in this process.
    last_write_ts: AtomicI64,
    inflight: Semaphore,
    known_buckets: Mutex<HashSet<(RoomId, i64)>>,
    reads: Mutex<HashMap<ReadKey, Vec<oneshot::Sender<ReadResult>>>>,
}

/// A driver (or row decoding) error, kept whole as the failure's source.
fn err(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(Cause::of(e))
}

/// Checks a keyspace name: CQL identifiers, unquoted.
pub fn valid_keyspace(ks: &str) -> bool {
    !ks.is_empty()
        && ks.len() <= 48
        && ks.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && ks.as_bytes()[0].is_ascii_alphabetic()
}

impl ScyllaStore {
    /// Connects, creates or migrates the schema, and prepares every statement.
    pub async fn connect(cfg: &ScyllaConfig) -> anyhow::Result<ScyllaStore> {
        anyhow::ensure!(
            valid_keyspace(&cfg.keyspace),
            "invalid keyspace name {:?}",
            cfg.keyspace
        );
        let session = SessionBuilder::new()
            .known_nodes(&cfg.nodes)
            .connection_timeout(Duration::from_secs(5))
            .build()
            .await
            .with_context(|| format!("cannot connect to the CQL store at {:?}", cfg.nodes))?;
        let ks = &cfg.keyspace;
        session
            .query_unpaged(
                format!(
                    "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {}",
                    cfg.replication
                ),
                (),
            )
            .await
            .with_context(|| format!("creating keyspace {ks}"))?;
        migrate(&session, ks).await?;
        let bucket_ms = i64::try_from(cfg.bucket.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        check_bucket_width(&session, ks, bucket_ms).await?;

        let prepare = |cql: String, write: bool| {
            let session = &session;
            async move {
                let mut p = session
                    .prepare(cql.clone())
                    .await
                    .with_context(|| format!("preparing {cql}"))?;
                p.set_consistency(cfg.consistency);
                p.set_is_idempotent(true);
                p.set_request_timeout(Some(cfg.request_timeout));
                if !write {
                    p.set_page_size(ROW_PAGE as i32);
                }
                anyhow::Ok(p)
            }
        };
        let cols = "id, sender, cid, body, ts";
        Ok(ScyllaStore {
            insert_msg: prepare(
                format!("INSERT INTO {ks}.messages (room, bucket, id, sender, cid, body, ts) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?"),
                true,
            )
            .await?,
            insert_bucket: prepare(format!("INSERT INTO {ks}.room_buckets (room, bucket) VALUES (?, ?) USING TTL ?"), true).await?,
            buckets_desc: prepare(
                format!("SELECT bucket FROM {ks}.room_buckets WHERE room = ? AND bucket <= ? ORDER BY bucket DESC LIMIT ?"),
                false,
            )
            .await?,
            buckets_asc: prepare(
                format!("SELECT bucket FROM {ks}.room_buckets WHERE room = ? AND bucket >= ? ORDER BY bucket ASC LIMIT ?"),
                false,
            )
            .await?,
            msgs_desc: prepare(
                format!("SELECT {cols} FROM {ks}.messages WHERE room = ? AND bucket = ? AND id > ? AND id < ? ORDER BY id DESC LIMIT ?"),
                false,
            )
            .await?,
            msgs_asc: prepare(
                format!("SELECT {cols} FROM {ks}.messages WHERE room = ? AND bucket = ? AND id > ? AND id < ? ORDER BY id ASC LIMIT ?"),
                false,
            )
            .await?,
            // Readiness must fail when writes would: probe with a write at the same
            // consistency, into the keyspace the messages go to.
            probe: prepare(format!("INSERT INTO {ks}.meta (key, value) VALUES ('probe', ?)"), true).await?,
            fence_range: prepare(
                format!("DELETE FROM {ks}.messages USING TIMESTAMP ? WHERE room = ? AND bucket = ? AND id > ?"),
                true,
            )
            .await?,
            room_get: prepare(format!("SELECT ended_at, expires_at FROM {ks}.rooms WHERE room = ?"), false).await?,
            room_set: prepare(
                format!("INSERT INTO {ks}.rooms (room, ended_at, expires_at) VALUES (?, ?, ?) USING TIMESTAMP ?"),
                true,
            )
            .await?,
            cursor_get: prepare(
                format!("SELECT delivered, attempts, last_error FROM {ks}.hook_cursors WHERE room = ?"),
                false,
            )
            .await?,
            cursor_set: prepare(
                format!("INSERT INTO {ks}.hook_cursors (room, delivered, attempts, last_error) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"),
                true,
            )
            .await?,
            cursor_clear: prepare(format!("DELETE FROM {ks}.hook_cursors USING TIMESTAMP ? WHERE room = ?"), true).await?,
            cursor_rooms: prepare(format!("SELECT room FROM {ks}.hook_cursors LIMIT ?"), false).await?,
            dead_put: prepare(
                format!("INSERT INTO {ks}.dead_letters ({DEAD_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                true,
            )
            .await?,
            dead_of_room: prepare(format!("SELECT {DEAD_COLS} FROM {ks}.dead_letters WHERE room = ? LIMIT ?"), false).await?,
            dead_all: prepare(format!("SELECT {DEAD_COLS} FROM {ks}.dead_letters LIMIT ?"), false).await?,
            dead_one: prepare(format!("SELECT {DEAD_COLS} FROM {ks}.dead_letters WHERE room = ? AND id = ?"), false).await?,
            dead_delete: prepare(format!("DELETE FROM {ks}.dead_letters WHERE room = ? AND id = ?"), true).await?,
            message_ttl: i32::try_from(cfg.message_ttl.as_secs()).unwrap_or(i32::MAX),
            last_write_ts: AtomicI64::new(0),
            session,
            bucket_ms,
            consistency: cfg.consistency,
            inflight: Semaphore::new(cfg.max_inflight.max(1)),
            known_buckets: Mutex::new(HashSet::new()),
            reads: Mutex::new(HashMap::new()),
        })
    }

    /// A bucket's index row outlives the messages it points to by a bucket's width.
    fn bucket_ttl(&self) -> i32 {
        if self.message_ttl == 0 {
            return 0;
        }
        let bucket_s = i32::try_from(self.bucket_ms / 1000).unwrap_or(i32::MAX);
        self.message_ttl.saturating_add(bucket_s)
    }

    fn bucket_of(&self, id: MessageId) -> i64 {
        self.bucket_at(id.unix_ms() as i64)
    }

    fn bucket_at(&self, ms: i64) -> i64 {
        ms - ms.rem_euclid(self.bucket_ms)
    }

    /// A write timestamp (µs) newer than every earlier one of this process.
    fn next_write_ts(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        let mut last = self.last_write_ts.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.last_write_ts.compare_exchange_weak(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    async fn fence_now(
        &self,
        room: &RoomId,
        after: MessageId,
        window: Duration,
    ) -> Result<(), StoreError> {
        let now = common::id::now_ms() as i64;
        let window = i64::try_from(window.as_millis()).unwrap_or(i64::MAX / 4);
        // Above the head, whatever its age (an earlier owner's late write was minted after
        // it); for an empty room, what could have been minted within the window.
        let from = if after.0 == 0 {
            self.bucket_at(now.saturating_sub(window).max(0))
        } else {
            self.bucket_of(after)
        };
        let to = self.bucket_at(now.saturating_add(window));
        let first = from.max(to - (FENCE_BUCKETS_MAX - 1) * self.bucket_ms);
        let ts = self.next_write_ts();
        let buckets = (0..)
            .map(|i| first + i * self.bucket_ms)
            .take_while(|b| *b <= to);
        let deletes = buckets.map(|bucket| {
            self.session.execute_unpaged(
                &self.fence_range,
                (ts, room.as_str(), bucket, after.0 as i64),
            )
        });
        for r in futures_util::future::join_all(deletes).await {
            r.map_err(err)?;
        }
        Ok(())
    }

    async fn append_now(
        &self,
        room: &RoomId,
        batch: &[ChatMessage],
        guard: &dyn WriteGuard,
    ) -> Result<(), StoreError> {
        let _permit = self.inflight.acquire().await.map_err(err)?;
        // One unlogged batch per partition: rows of one (room, bucket) are applied together
        // by the replica that owns them.
        let mut by_bucket: Vec<(i64, Vec<&ChatMessage>)> = Vec::new();
        for msg in batch {
            let b = self.bucket_of(msg.id);
            match by_bucket.last_mut() {
                Some((last, rows)) if *last == b => rows.push(msg),
                _ => by_bucket.push((b, vec![msg])),
            }
        }
        for (bucket, rows) in &by_bucket {
            self.index_bucket(room, *bucket).await?;
            // Keep each CQL batch well under the servers' batch-size limits (Cassandra fails
            // batches over 50 KiB by default, ScyllaDB over 1 MiB).
            let mut start = 0;
            while start < rows.len() {
                let mut end = start;
                let mut bytes = 0;
                while end < rows.len()
                    && (end == start || bytes + rows[end].body.len() <= BATCH_BYTES)
                {
                    bytes += rows[end].body.len() + 64;
                    end += 1;
                }
                self.write_batch(room, *bucket, &rows[start..end], guard)
                    .await?;
                start = end;
            }
        }
        Ok(())
    }

    async fn write_batch(
        &self,
        room: &RoomId,
        bucket: i64,
        rows: &[&ChatMessage],
        guard: &dyn WriteGuard,
    ) -> Result<(), StoreError> {
        let mut cql = Batch::new(BatchType::Unlogged);
        cql.set_consistency(self.consistency);
        cql.set_is_idempotent(true);
        // Newer than any fence this process wrote, older than any a later owner writes.
        cql.set_timestamp(Some(self.next_write_ts()));
        let mut values = Vec::with_capacity(rows.len());
        for msg in rows {
            cql.append_statement(self.insert_msg.clone());
            values.push((
                room.as_str(),
                bucket,
                msg.id.0 as i64,
                msg.from.as_str(),
                msg.cid.as_str(),
                msg.body.as_str(),
                msg.ts as i64,
                self.message_ttl,
            ));
        }
        // Stamped, then checked, with nothing in between that could wait: a pause before
        // the check is caught by it, and after it the write carries a timestamp from while
        // the writer still owned the room, older than any fence written since.
        if !guard.may_write() {
            return Err(StoreError::Fenced);
        }
        self.session.batch(&cql, values).await.map_err(err)?;
        Ok(())
    }

    /// Records that `bucket` of `room` holds messages; skipped when already known here.
    async fn index_bucket(&self, room: &RoomId, bucket: i64) -> Result<(), StoreError> {
        let key = (room.clone(), bucket);
        if self
            .known_buckets
            .lock()
            .map(|k| k.contains(&key))
            .unwrap_or(false)
        {
            return Ok(());
        }
        self.session
            .execute_unpaged(
                &self.insert_bucket,
                (room.as_str(), bucket, self.bucket_ttl()),
            )
            .await
            .map_err(err)?;
        if let Ok(mut known) = self.known_buckets.lock() {
            if known.len() >= KNOWN_BUCKETS_MAX {
                known.clear();
            }
            known.insert(key);
        }
        Ok(())
    }

    /// One page of history, shared with identical reads already in flight.
    async fn read_coalesced(&self, room: &RoomId, q: HistoryQuery) -> ReadResult {
        let key = (room.clone(), q);
        let waiter = {
            let mut reads = self
                .reads
                .lock()
                .map_err(|_| StoreError::Unavailable("read coalescing lock poisoned".into()))?;
            match reads.get_mut(&key) {
                Some(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    reads.insert(key.clone(), Vec::new());
                    None
                }
            }
        };
        if let Some(rx) = waiter {
            metrics::counter!(m::STORE_READS_COALESCED).increment(1);
            // If the leading read was cancelled, read for ourselves.
            return match rx.await {
                Ok(result) => result,
                Err(_) => self.read_now(room, q).await,
            };
        }
        let guard = LeaderGuard {
            reads: &self.reads,
            key: Some(key),
        };
        let result = self.read_now(room, q).await;
        for w in guard.finish() {
            let _ = w.send(result.clone());
        }
        result
    }

    async fn read_now(&self, room: &RoomId, q: HistoryQuery) -> ReadResult {
        // Ids are 63 bits and stored as bigint; a cursor above that is clamped, not wrapped
        // to a negative number, so any u64 cursor pages as it does on the memory store.
        let clamp = |id: MessageId| i64::try_from(id.0).unwrap_or(i64::MAX);
        let lower = q.after.map_or(-1, clamp);
        let upper = q.before.map_or(i64::MAX, clamp);
        if lower >= upper || q.limit == 0 {
            return Ok(Vec::new());
        }
        let lower_bucket = q.after.map_or(i64::MIN, |a| self.bucket_of(a));
        let upper_bucket = q.before.map_or(i64::MAX, |b| self.bucket_of(b));
        let newest_first = q.from == PageFrom::Newest;
        let mut out: Vec<ChatMessage> = Vec::new();
        let mut cursor = if newest_first {
            upper_bucket
        } else {
            lower_bucket
        };
        'buckets: loop {
            let stmt = if newest_first {
                &self.buckets_desc
            } else {
                &self.buckets_asc
            };
            let buckets: Vec<i64> = self
                .session
                .execute_unpaged(stmt, (room.as_str(), cursor, BUCKET_PAGE))
                .await
                .map_err(err)?
                .into_rows_result()
                .map_err(err)?
                .rows::<(i64,)>()
                .map_err(err)?
                .map(|r| r.map(|(b,)| b))
                .collect::<Result<_, _>>()
                .map_err(err)?;
            for &bucket in &buckets {
                let past = if newest_first {
                    bucket < lower_bucket
                } else {
                    bucket > upper_bucket
                };
                if past {
                    break 'buckets;
                }
                self.read_bucket(room, bucket, lower, upper, newest_first, q.limit, &mut out)
                    .await?;
                if out.len() >= q.limit {
                    break 'buckets;
                }
            }
            match buckets.last() {
                Some(&last) if buckets.len() == BUCKET_PAGE as usize => {
                    cursor = if newest_first { last - 1 } else { last + 1 };
                }
                _ => break,
            }
        }
        if newest_first {
            out.reverse();
        }
        Ok(out)
    }

    /// Appends rows of one bucket within (lower, upper), in walking order, up to `limit`.
    #[allow(clippy::too_many_arguments)]
    async fn read_bucket(
        &self,
        room: &RoomId,
        bucket: i64,
        mut lower: i64,
        mut upper: i64,
        newest_first: bool,
        limit: usize,
        out: &mut Vec<ChatMessage>,
    ) -> Result<(), StoreError> {
        let stmt = if newest_first {
            &self.msgs_desc
        } else {
            &self.msgs_asc
        };
        loop {
            let want = (limit - out.len()).min(ROW_PAGE);
            let rows = self
                .session
                .execute_unpaged(stmt, (room.as_str(), bucket, lower, upper, want as i32))
                .await
                .map_err(err)?
                .into_rows_result()
                .map_err(err)?;
            let mut got = 0;
            for row in rows
                .rows::<(i64, String, String, String, i64)>()
                .map_err(err)?
            {
                let (id, sender, cid, body, ts) = row.map_err(err)?;
                got += 1;
                if newest_first {
                    upper = id;
                } else {
                    lower = id;
                }
                out.push(ChatMessage {
                    room: room.clone(),
                    id: MessageId(id as u64),
                    from: UserId::new(sender).map_err(err)?,
                    cid: ClientMsgId::new(cid).map_err(err)?,
                    body,
                    ts: ts as u64,
                });
            }
            if got < want || out.len() >= limit {
                return Ok(());
            }
        }
    }
}

/// Removes a coalesced read's entry even if the leading reader is cancelled, so followers
/// never wait on a read nobody performs.
struct LeaderGuard<'a> {
    reads: &'a Mutex<HashMap<ReadKey, Vec<oneshot::Sender<ReadResult>>>>,
    key: Option<ReadKey>,
}

impl LeaderGuard<'_> {
    fn finish(mut self) -> Vec<oneshot::Sender<ReadResult>> {
        self.take()
    }

    fn take(&mut self) -> Vec<oneshot::Sender<ReadResult>> {
        let Some(key) = self.key.take() else {
            return Vec::new();
        };
        self.reads
            .lock()
            .ok()
            .and_then(|mut r| r.remove(&key))
            .unwrap_or_default()
    }
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        // Dropping the senders wakes followers, which then read for themselves.
        drop(self.take());
    }
}

async fn migrate(session: &Session, ks: &str) -> anyhow::Result<()> {
    session
        .query_unpaged(
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.schema_migrations (version int PRIMARY KEY, description text, applied_at bigint)"
            ),
            (),
        )
        .await
        .with_context(|| format!("creating {ks}.schema_migrations"))?;
    let applied: HashSet<i32> = session
        .query_unpaged(format!("SELECT version FROM {ks}.schema_migrations"), ())
        .await?
        .into_rows_result()?
        .rows::<(i32,)>()?
        .map(|r| r.map(|(v,)| v))
        .collect::<Result<_, _>>()?;
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
        for stmt in migration.statements {
            session
                .query_unpaged(stmt.replace("{ks}", ks), ())
                .await
                .with_context(|| format!("schema v{}", migration.version))?;
        }
        session
            .query_unpaged(
                format!("INSERT INTO {ks}.schema_migrations (version, description, applied_at) VALUES (?, ?, ?)"),
                (migration.version, migration.description, common::id::now_ms() as i64),
            )
            .await?;
        tracing::info!(
            keyspace = ks,
            version = migration.version,
            "schema migrated"
        );
    }
    Ok(())
}

/// The bucket width is part of the data layout: refuse to run with a different one.
async fn check_bucket_width(session: &Session, ks: &str, bucket_ms: i64) -> anyhow::Result<()> {
    let current: Option<(String,)> = session
        .query_unpaged(
            format!("SELECT value FROM {ks}.meta WHERE key = 'bucket_ms'"),
            (),
        )
        .await?
        .into_rows_result()?
        .maybe_first_row::<(String,)>()?;
    match current {
        Some((v,)) if v == bucket_ms.to_string() => Ok(()),
        Some((v,)) => anyhow::bail!(
            "keyspace {ks} stores messages in {v} ms buckets; --cql-bucket must be the same ({bucket_ms} ms given)"
        ),
        None => {
            // First start: record the width. A concurrent first start with another width
            // would race here; nodes of one cluster share their config.
            session
                .query_unpaged(
                    format!("INSERT INTO {ks}.meta (key, value) VALUES ('bucket_ms', ?)"),
                    (bucket_ms.to_string(),),
                )
                .await?;
            Ok(())
        }
    }
}

impl MessageStore for ScyllaStore {
    fn append<'a>(
        &'a self,
        room: &'a RoomId,
        batch: &'a [ChatMessage],
        guard: &'a dyn WriteGuard,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.append_now(room, batch, guard))
    }

    fn read<'a>(
        &'a self,
        room: &'a RoomId,
        query: HistoryQuery,
    ) -> StoreFuture<'a, Vec<ChatMessage>> {
        Box::pin(self.read_coalesced(room, query))
    }

    fn fence<'a>(
        &'a self,
        room: &'a RoomId,
        after: MessageId,
        window: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.fence_now(room, after, window))
    }

    fn room_state<'a>(&'a self, room: &'a RoomId) -> StoreFuture<'a, RoomState> {
        Box::pin(async move {
            let row = self
                .session
                .execute_unpaged(&self.room_get, (room.as_str(),))
                .await
                .map_err(err)?
                .into_rows_result()
                .map_err(err)?
                .maybe_first_row::<(Option<i64>, Option<i64>)>()
                .map_err(err)?;
            Ok(
                row.map_or_else(RoomState::default, |(ended, expires)| RoomState {
                    ended_at: ended.map(|v| v as u64),
                    expires_at: expires.map(|v| v as u64),
                }),
            )
        })
    }

    fn set_room_state<'a>(
        &'a self,
        room: &'a RoomId,
        state: RoomState,
        guard: &'a dyn WriteGuard,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let ts = self.next_write_ts();
            if !guard.may_write() {
                return Err(StoreError::Fenced);
            }
            let at = |v: Option<u64>| v.map(|v| v as i64);
            self.session
                .execute_unpaged(
                    &self.room_set,
                    (room.as_str(), at(state.ended_at), at(state.expires_at), ts),
                )
                .await
                .map_err(err)?;
            Ok(())
        })
    }

    fn hook_cursor<'a>(&'a self, room: &'a RoomId) -> StoreFuture<'a, Option<HookCursor>> {
        Box::pin(async move {
            let row = self
                .session
                .execute_unpaged(&self.cursor_get, (room.as_str(),))
                .await
                .map_err(err)?
                .into_rows_result()
                .map_err(err)?
                .maybe_first_row::<(Option<i64>, Option<i32>, Option<String>)>()
                .map_err(err)?;
            Ok(row.map(|(delivered, attempts, last_error)| HookCursor {
                delivered: MessageId(delivered.unwrap_or(0).max(0) as u64),
                attempts: attempts.unwrap_or(0).max(0) as u32,
                last_error: last_error.unwrap_or_default(),
            }))
        })
    }

    fn set_hook_cursor<'a>(&'a self, room: &'a RoomId, cursor: HookCursor) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let ts = self.next_write_ts();
            let delivered = i64::try_from(cursor.delivered.0).unwrap_or(i64::MAX);
            let attempts = i32::try_from(cursor.attempts).unwrap_or(i32::MAX);
            self.session
                .execute_unpaged(
                    &self.cursor_set,
                    (
                        room.as_str(),
                        delivered,
                        attempts,
                        cursor.last_error.as_str(),
                        ts,
                    ),
                )
                .await
                .map_err(err)?;
            Ok(())
        })
    }

    fn clear_hook_cursor<'a>(&'a self, room: &'a RoomId) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let ts = self.next_write_ts();
            self.session
                .execute_unpaged(&self.cursor_clear, (ts, room.as_str()))
                .await
                .map_err(err)?;
            Ok(())
        })
    }

    fn hook_rooms(&self, limit: usize) -> StoreFuture<'_, Vec<RoomId>> {
        Box::pin(async move {
            let limit = i32::try_from(limit).unwrap_or(i32::MAX);
            self.session
                .execute_unpaged(&self.cursor_rooms, (limit,))
                .await
                .map_err(err)?
                .into_rows_result()
                .map_err(err)?
                .rows::<(String,)>()
                .map_err(err)?
                .map(|r| {
                    r.map_err(err)
                        .and_then(|(room,)| RoomId::new(room).map_err(err))
                })
                .collect()
        })
    }

    fn put_dead_letter<'a>(&'a self, dead: &'a DeadLetter) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let m = &dead.message;
            self.session
                .execute_unpaged(
                    &self.dead_put,
                    (
                        m.room.as_str(),
                        m.id.0 as i64,
                        m.from.as_str(),
                        m.cid.as_str(),
                        m.body.as_str(),
                        m.ts as i64,
                        i32::try_from(dead.attempts).unwrap_or(i32::MAX),
                        dead.last_error.as_str(),
                        dead.dead_at as i64,
                    ),
                )
                .await
                .map_err(err)?;
            Ok(())
        })
    }

    fn dead_letters<'a>(
        &'a self,
        room: Option<&'a RoomId>,
        limit: usize,
    ) -> StoreFuture<'a, Vec<DeadLetter>> {
        Box::pin(async move {
            let limit = i32::try_from(limit).unwrap_or(i32::MAX);
            let result = match room {
                Some(room) => {
                    self.session
                        .execute_unpaged(&self.dead_of_room, (room.as_str(), limit))
                        .await
                }
                None => self.session.execute_unpaged(&self.dead_all, (limit,)).await,
            };
            result
                .map_err(err)?
                .into_rows_result()
                .map_err(err)?
                .rows::<DeadRow>()
                .map_err(err)?
                .map(|r| r.map_err(err).and_then(dead_letter_row))
                .collect()
        })
    }

    fn dead_letter<'a>(
        &'a self,
        room: &'a RoomId,
        id: MessageId,
    ) -> StoreFuture<'a, Option<DeadLetter>> {
        Box::pin(async move {
            let key = (room.as_str(), i64::try_from(id.0).unwrap_or(i64::MAX));
            self.session
                .execute_unpaged(&self.dead_one, key)
                .await
                .map_err(err)?
                .into_rows_result()
                .map_err(err)?
                .maybe_first_row::<DeadRow>()
                .map_err(err)?
                .map(dead_letter_row)
                .transpose()
        })
    }

    fn delete_dead_letter<'a>(&'a self, room: &'a RoomId, id: MessageId) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let found = self.dead_letter(room, id).await?.is_some();
            let key = (room.as_str(), i64::try_from(id.0).unwrap_or(i64::MAX));
            if found {
                self.session
                    .execute_unpaged(&self.dead_delete, key)
                    .await
                    .map_err(err)?;
            }
            Ok(found)
        })
    }

    fn check(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.session
                .execute_unpaged(&self.probe, (common::id::now_ms().to_string(),))
                .await
                .map(|_| ())
                .map_err(err)
        })
    }

    fn name(&self) -> &'static str {
        "cql"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyspace_names() {
        assert!(valid_keyspace("chat"));
        assert!(valid_keyspace("chat_test_42"));
        assert!(!valid_keyspace(""));
        assert!(!valid_keyspace("1chat"));
        assert!(!valid_keyspace("chat; DROP"));
        assert!(!valid_keyspace(&"k".repeat(49)));
    }
}
