//! Reading every room of a `rebalance` run back at the end, for the oracle: through the
//! history API at `--url`, and straight from the CQL store (`--cql-nodes`,
//! `--cql-keyspace`) with the `scylla` crate.
//!
//! The CQL reader knows only the node's table layout (`room_buckets` lists a room's
//! non-empty buckets; `messages` holds its rows by `(room, bucket)`), not its code: it reads
//! every bucket listed, then every row of each, and hands back rows in ascending id. It
//! writes nothing and never reads a table but those two.

use std::time::Duration;

use anyhow::{anyhow, Context as _};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::response::{PagingState, PagingStateResponse};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;

use super::oracle::StoredRow;
use crate::http::{self, HttpClient};

/// Rows (and buckets) per CQL page.
const PAGE: i32 = 1000;
/// One CQL request's bound; the whole read-back has its own deadline.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A keyspace name the reader accepts: an unquoted CQL identifier (letters, digits, `_`,
/// a letter first, at most 48 characters), so it can be placed in a query as it is.
pub fn valid_keyspace(ks: &str) -> bool {
    let b = ks.as_bytes();
    (1..=48).contains(&b.len())
        && b[0].is_ascii_alphabetic()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// A session on the CQL store and the two reads the oracle needs.
pub struct CqlReader {
    session: Session,
    buckets: PreparedStatement,
    rows: PreparedStatement,
}

/// One room as the CQL store holds it.
#[derive(Debug, Default)]
pub struct CqlRoom {
    /// Ascending id.
    pub rows: Vec<StoredRow>,
    pub buckets: u64,
}

impl CqlReader {
    /// Connects to `nodes` (`host:port`) and prepares the reads of `keyspace`. Reads are at
    /// QUORUM, so they see every write a node acked at (LOCAL_)QUORUM in one datacenter.
    pub async fn connect(nodes: &[String], keyspace: &str) -> anyhow::Result<CqlReader> {
        anyhow::ensure!(valid_keyspace(keyspace), "invalid keyspace {keyspace:?}");
        let session = SessionBuilder::new()
            .known_nodes(nodes)
            .connection_timeout(CONNECT_TIMEOUT)
            .build()
            .await
            .map_err(|e| anyhow!("cannot connect to the CQL store at {nodes:?}: {e}"))?;
        let prepare = |cql: String| {
            let session = &session;
            async move {
                let mut p = session
                    .prepare(cql.clone())
                    .await
                    .map_err(|e| anyhow!("preparing {cql}: {e}"))?;
                p.set_consistency(Consistency::Quorum);
                p.set_is_idempotent(true);
                p.set_request_timeout(Some(REQUEST_TIMEOUT));
                p.set_page_size(PAGE);
                anyhow::Ok(p)
            }
        };
        let buckets = prepare(format!(
            "SELECT bucket FROM {keyspace}.room_buckets WHERE room = ?"
        ))
        .await?;
        let rows = prepare(format!(
            "SELECT id, sender, cid FROM {keyspace}.messages WHERE room = ? AND bucket = ?"
        ))
        .await?;
        Ok(CqlReader {
            session,
            buckets,
            rows,
        })
    }

    /// Every row of `room`: its buckets, then each bucket's rows, all pages.
    pub async fn room(&self, room: &str) -> anyhow::Result<CqlRoom> {
        let mut buckets: Vec<i64> = Vec::new();
        let mut paging = PagingState::start();
        loop {
            let (res, next) = self
                .session
                .execute_single_page(&self.buckets, (room,), paging)
                .await
                .with_context(|| format!("reading the buckets of {room}"))?;
            let res = res.into_rows_result()?;
            for b in res.rows::<(i64,)>()? {
                buckets.push(b?.0);
            }
            match next {
                PagingStateResponse::HasMorePages { state } => paging = state,
                PagingStateResponse::NoMorePages => break,
            }
        }
        buckets.sort_unstable();
        let mut out = CqlRoom {
            rows: Vec::new(),
            buckets: buckets.len() as u64,
        };
        for bucket in buckets {
            let mut paging = PagingState::start();
            loop {
                let (res, next) = self
                    .session
                    .execute_single_page(&self.rows, (room, bucket), paging)
                    .await
                    .with_context(|| format!("reading bucket {bucket} of {room}"))?;
                let res = res.into_rows_result()?;
                for r in res.rows::<(i64, Option<String>, Option<String>)>()? {
                    let (id, sender, cid) = r?;
                    let id = u64::try_from(id)
                        .map_err(|_| anyhow!("{room}: negative id {id} in bucket {bucket}"))?;
                    out.rows.push(StoredRow {
                        id,
                        sender: sender.unwrap_or_default(),
                        cid: cid.unwrap_or_default(),
                    });
                }
                match next {
                    PagingStateResponse::HasMorePages { state } => paging = state,
                    PagingStateResponse::NoMorePages => break,
                }
            }
        }
        // Buckets ascend and each is read newest first (the table's clustering order): the
        // store's order of the room is ascending id.
        out.rows.sort_by_key(|r| r.id);
        Ok(out)
    }
}

/// What reading every room from one source gave.
#[derive(Debug, Default)]
pub struct Reading {
    /// Per room, ascending id; empty for a room that could not be read.
    pub rooms: Vec<Vec<StoredRow>>,
    /// Pages (history) or buckets (CQL) read.
    pub units: u64,
    /// The first failure; the reading is then incomplete.
    pub error: Option<String>,
}

impl Reading {
    pub fn rows(&self) -> u64 {
        self.rooms.iter().map(|r| r.len() as u64).sum()
    }
}

/// Every room through the history API, oldest first, within `deadline`.
pub async fn read_history(
    http: &mut HttpClient,
    rooms: &[String],
    credentials: &str,
    limit: u32,
    deadline: tokio::time::Instant,
) -> Reading {
    let mut out = Reading::default();
    for room in rooms {
        match http::read_history(http, room, credentials, limit, deadline).await {
            Ok((h, pages)) => {
                out.units += pages;
                out.rooms.push(
                    h.into_iter()
                        .map(|e| StoredRow {
                            id: e.id,
                            sender: e.from,
                            cid: e.cid,
                        })
                        .collect(),
                );
            }
            Err(e) => {
                out.error.get_or_insert_with(|| format!("{e:#}"));
                out.rooms.push(Vec::new());
            }
        }
    }
    out
}

/// Every room straight from the CQL store, within `deadline` (connecting included).
pub async fn read_cql(
    nodes: &[String],
    keyspace: &str,
    rooms: &[String],
    deadline: tokio::time::Instant,
) -> Reading {
    let mut out = Reading::default();
    let read = async {
        let reader = CqlReader::connect(nodes, keyspace).await?;
        for room in rooms {
            let r = reader.room(room).await?;
            out.units += r.buckets;
            out.rooms.push(r.rows);
        }
        anyhow::Ok(())
    };
    let result = match tokio::time::timeout_at(deadline, read).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!("the CQL read-back did not finish in time")),
    };
    if let Err(e) = result {
        out.error = Some(format!("{e:#}"));
    }
    out.rooms.resize_with(rooms.len(), Vec::new);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyspaces_are_plain_identifiers() {
        for ok in ["t_chat_bench", "chat", "K1"] {
            assert!(valid_keyspace(ok), "{ok}");
        }
        for bad in ["", "1ks", "a-b", "ks;drop", "a.b", &"k".repeat(49)] {
            assert!(!valid_keyspace(bad), "{bad}");
        }
    }
}
