//! A webhook receiver for tests: an HTTP server on port 0 that records every delivery and
//! answers as its mode says (take it, fail it, or never answer).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 200 to everything.
    Take,
    /// 500 to the next `n` requests, then 200.
    FailNext(usize),
    /// 500 to everything.
    Fail,
    /// Reads the request and never answers.
    Hang,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: u64,
    pub room: String,
    pub attempt: u64,
    pub body: serde_json::Value,
    pub raw: Vec<u8>,
    pub signature: String,
    pub idempotency_key: String,
    /// Whether the receiver answered 2xx.
    pub taken: bool,
}

#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Delivery>>>,
    mode: Arc<Mutex<Mode>>,
}

impl Receiver {
    pub async fn start(mode: Mode) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let r = Receiver {
            addr: listener.local_addr().expect("addr"),
            log: Arc::default(),
            mode: Arc::new(Mutex::new(mode)),
        };
        let served = r.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let r = served.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let r = r.clone();
                        async move { r.answer(req).await }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        r
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().expect("lock") = mode;
    }

    pub fn log(&self) -> Vec<Delivery> {
        self.log.lock().expect("lock").clone()
    }

    /// The ids taken (answered 2xx), in the order first taken, each once: what a receiver
    /// that dedupes by id keeps.
    pub fn taken_once(&self) -> Vec<u64> {
        let mut seen = BTreeSet::new();
        self.log()
            .into_iter()
            .filter(|d| d.taken && seen.insert(d.id))
            .map(|d| d.id)
            .collect()
    }

    async fn answer(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let (signature, idempotency_key, attempt) = (
            header("x-chat-signature"),
            header("idempotency-key"),
            header("x-chat-attempt"),
        );
        let raw = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default();
        let body: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_default();
        let mode = {
            let mut m = self.mode.lock().expect("lock");
            let now = *m;
            if let Mode::FailNext(n) = now {
                *m = if n <= 1 {
                    Mode::Take
                } else {
                    Mode::FailNext(n - 1)
                };
            }
            now
        };
        let taken = mode == Mode::Take;
        self.log.lock().expect("lock").push(Delivery {
            id: body["id"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            room: body["room"].as_str().unwrap_or("").to_owned(),
            attempt: attempt.parse().unwrap_or(0),
            body,
            raw,
            signature,
            idempotency_key,
            taken,
        });
        if mode == Mode::Hang {
            std::future::pending::<()>().await;
        }
        let status = if taken { 200 } else { 500 };
        Ok(hyper::Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("response"))
    }
}
