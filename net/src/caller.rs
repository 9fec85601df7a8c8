//! `Caller`: one multiplexed connection to one server, re-established on demand.
//!
//! A call registers a oneshot under a fresh correlation id, queues its frame for the
//! connection's writer task (which coalesces queued frames into one flush) and waits
//! for the reader task to route the matching response back. Answers may arrive in any
//! order. When the connection fails, every waiting call fails with `Disconnected`; the
//! next call reconnects (openraft backs off between attempts on `Unreachable`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use keel_protocol::codec::FrameCodec;
use keel_protocol::limits::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use keel_protocol::{ErrorCode, Frame};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};
use tokio_util::codec::FramedRead;

use crate::frame_writer::FrameWriter;
use crate::limits::WRITE_GATHER_BYTES_MAX;

use crate::limits::{CONNECT_TIMEOUT, INFLIGHT_MAX, RECONNECT_BACKOFF, SEND_QUEUE_CAPACITY};

/// Why a call failed. `target` names the server (a node id, or 0 when unknown).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    #[error("cannot reach node {target} at {addr}: {reason}")]
    Unreachable {
        target: u64,
        addr: String,
        reason: String,
        /** The address refused the connection: nothing listens there (the server's
        process is not running), as opposed to no answer at all. */
        refused: bool,
    },
    #[error("connection to node {target} was lost: {reason}")]
    Disconnected { target: u64, reason: String },
    #[error("node {target} did not answer within {timeout:?}")]
    Timeout { target: u64, timeout: Duration },
    #[error("node {target} refused the request: {code}: {message}")]
    Refused {
        target: u64,
        code: ErrorCode,
        message: String,
        /** Details some refusals carry (e.g. `NotLeader`). */
        body: Bytes,
    },
    #[error("node {target} sent a malformed answer: {reason}")]
    Malformed { target: u64, reason: String },
}

type Answer = Result<(ErrorCode, String, Bytes), CallError>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>;

/// One live connection. Dropping it stops its reader and writer tasks.
struct Connection {
    /// The protocol version negotiated in the handshake.
    version: u16,
    tx: mpsc::Sender<(Frame, Vec<Bytes>)>,
    pending: Pending,
    closed: Arc<AtomicBool>,
    inflight: Arc<Semaphore>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Connection {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn fail_all(pending: &Pending, target: u64, reason: &str) {
    let waiting: Vec<_> = pending.lock().expect("pending lock poisoned").drain().collect();
    for (_, tx) in waiting {
        let _ = tx.send(Err(CallError::Disconnected { target, reason: reason.to_string() }));
    }
}

/// A request sent right after the version handshake on every new connection (the
/// peer transport says who is calling whom); any answer but success refuses the
/// connection.
#[derive(Debug, Clone)]
pub struct Identification {
    pub api_key: u16,
    pub payload: Bytes,
}

/// Calls to one server over one multiplexed connection, reconnecting after failures.
pub struct Caller {
    target: u64,
    addr: String,
    identification: Option<Identification>,
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// The last failed connect, repeated to calls for `RECONNECT_BACKOFF`.
    failed: Mutex<Option<(Instant, CallError)>>,
    next_id: AtomicU64,
}

impl Caller {
    /// A caller for the server `target` (a node id; 0 if unknown) at `addr`. Connects
    /// on the first call.
    pub fn new(target: u64, addr: String, identification: Option<Identification>) -> Caller {
        Caller { target, addr, identification, conn: tokio::sync::Mutex::new(None), failed: Mutex::new(None), next_id: AtomicU64::new(1) }
    }

    pub fn target(&self) -> u64 {
        self.target
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends request `api_key` with `payload` and waits up to `timeout` for the answer's
    /// payload. A non-`None` error code in the answer is `CallError::Refused`.
    pub async fn call(&self, api_key: u16, payload: Bytes, timeout: Duration) -> Result<Bytes, CallError> {
        self.call_versioned(api_key, &|_| payload.clone(), timeout).await.map(|(_, body)| body)
    }

    /// Like [`Caller::call`], with a payload made of `head` followed by the `tail`
    /// parts, each written from its own buffer (a header and the record batches after
    /// it, without copying them into one request buffer).
    pub async fn call_with_tail(&self, api_key: u16, head: Bytes, tail: Vec<Bytes>, timeout: Duration) -> Result<Bytes, CallError> {
        self.send_call(api_key, &|_| (head.clone(), tail.clone()), timeout).await.map(|(_, body)| body)
    }

    /// Like [`Caller::call`], for versioned bodies: `encode` builds the payload for the
    /// connection's negotiated protocol version, which is returned with the answer so
    /// the caller decodes it for the same version.
    pub async fn call_versioned(&self, api_key: u16, encode: &(dyn Fn(u16) -> Bytes + Sync), timeout: Duration) -> Result<(u16, Bytes), CallError> {
        self.send_call(api_key, &|version| (encode(version), Vec::new()), timeout).await
    }

    /// Like [`Caller::call_versioned`], for a payload made of a head and tail parts
    /// (e.g. a produce request's header and its record batch), each written from its
    /// own buffer.
    pub async fn call_versioned_with_tail(
        &self,
        api_key: u16,
        encode: &(dyn Fn(u16) -> (Bytes, Vec<Bytes>) + Sync),
        timeout: Duration,
    ) -> Result<(u16, Bytes), CallError> {
        self.send_call(api_key, encode, timeout).await
    }

    /// Sends a request whose payload `encode` builds (head and tail parts) for the
    /// connection's version, and waits for the answer.
    async fn send_call(&self, api_key: u16, encode: &(dyn Fn(u16) -> (Bytes, Vec<Bytes>) + Sync), timeout: Duration) -> Result<(u16, Bytes), CallError> {
        let deadline = Instant::now() + timeout;
        let timed_out = || CallError::Timeout { target: self.target, timeout };
        let conn = timeout_at(deadline, self.connection()).await.map_err(|_| timed_out())??;
        let version = conn.version;
        let (payload, tail) = encode(version);
        let _permit =
            timeout_at(deadline, conn.inflight.clone().acquire_owned()).await.map_err(|_| timed_out())?.expect("the in-flight semaphore is never closed");
        let correlation_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().expect("pending lock poisoned").insert(correlation_id, tx);
        let frame = Frame::Request { correlation_id, api_key, payload };
        if timeout_at(deadline, conn.tx.send((frame, tail))).await.map_err(|_| timed_out())?.is_err() {
            conn.pending.lock().expect("pending lock poisoned").remove(&correlation_id);
            conn.closed.store(true, Ordering::Release);
            return Err(CallError::Disconnected { target: self.target, reason: "writer stopped".into() });
        }
        match timeout_at(deadline, rx).await {
            Err(_) => {
                conn.pending.lock().expect("pending lock poisoned").remove(&correlation_id);
                Err(timed_out())
            }
            Ok(Err(_)) => Err(CallError::Disconnected { target: self.target, reason: "connection closed".into() }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Ok(Ok((ErrorCode::None, _, payload)))) => Ok((version, payload)),
            Ok(Ok(Ok((code, message, body)))) => Err(CallError::Refused { target: self.target, code, message, body }),
        }
    }

    async fn connection(&self) -> Result<Arc<Connection>, CallError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if !c.closed.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        *guard = None;
        if let Some((at, e)) = self.failed.lock().expect("failed lock poisoned").as_ref() {
            if at.elapsed() < RECONNECT_BACKOFF {
                return Err(e.clone());
            }
        }
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await.unwrap_or_else(|_| {
            Err(CallError::Unreachable {
                target: self.target,
                addr: self.addr.clone(),
                reason: format!("no handshake within {CONNECT_TIMEOUT:?}"),
                refused: false,
            })
        });
        let conn = match connected {
            Ok(conn) => Arc::new(conn),
            Err(e) => {
                *self.failed.lock().expect("failed lock poisoned") = Some((Instant::now(), e.clone()));
                return Err(e);
            }
        };
        *self.failed.lock().expect("failed lock poisoned") = None;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn connect(&self) -> Result<Connection, CallError> {
        let unreachable = |reason: String| CallError::Unreachable { target: self.target, addr: self.addr.clone(), reason, refused: false };
        let stream = TcpStream::connect(&self.addr).await.map_err(|e| CallError::Unreachable {
            target: self.target,
            addr: self.addr.clone(),
            reason: e.to_string(),
            refused: e.kind() == std::io::ErrorKind::ConnectionRefused,
        })?;
        crate::socket::configure(&stream).map_err(|e| unreachable(e.to_string()))?;
        let (r, w) = stream.into_split();
        let mut reader = FramedRead::new(r, FrameCodec);
        let mut writer = FrameWriter::new(w);
        writer.send(&Frame::Hello { min_version: PROTOCOL_VERSION_MIN, max_version: PROTOCOL_VERSION_MAX }).await.map_err(|e| unreachable(e.to_string()))?;
        let version = match reader.next().await {
            Some(Ok(Frame::HelloAck { version })) if (PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&version) => version,
            Some(Ok(Frame::HelloAck { version })) => {
                return Err(unreachable(format!("the server chose protocol version {version}, which this build does not speak")))
            }
            Some(Ok(Frame::Response { error, message, .. })) => return Err(unreachable(format!("handshake refused: {error}: {message}"))),
            other => return Err(unreachable(format!("bad handshake answer: {other:?}"))),
        };
        if let Some(id) = &self.identification {
            writer
                .send(&Frame::Request { correlation_id: 0, api_key: id.api_key, payload: id.payload.clone() })
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            match reader.next().await {
                Some(Ok(Frame::Response { correlation_id: 0, error: ErrorCode::None, .. })) => {}
                Some(Ok(Frame::Response { error, message, .. })) => return Err(unreachable(format!("identify refused: {error}: {message}"))),
                other => return Err(unreachable(format!("bad identify answer: {other:?}"))),
            }
        }

        let (tx, mut rx) = mpsc::channel::<(Frame, Vec<Bytes>)>(SEND_QUEUE_CAPACITY);
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let target = self.target;
        let writer_task = {
            let (pending, closed) = (pending.clone(), closed.clone());
            tokio::spawn(async move {
                let reason = loop {
                    let Some((frame, tail)) = rx.recv().await else { break "client dropped".to_string() };
                    writer.feed_with_tail(&frame, &tail);
                    // Gather whatever else is queued into the same write, up to a bound.
                    while writer.queued() < WRITE_GATHER_BYTES_MAX {
                        let Ok((frame, tail)) = rx.try_recv() else { break };
                        writer.feed_with_tail(&frame, &tail);
                    }
                    if let Err(e) = writer.flush().await {
                        break e.to_string();
                    }
                };
                closed.store(true, Ordering::Release);
                fail_all(&pending, target, &reason);
            })
        };
        let reader_task = {
            let (pending, closed) = (pending.clone(), closed.clone());
            tokio::spawn(async move {
                let reason = loop {
                    match reader.next().await {
                        Some(Ok(Frame::Response { correlation_id, error, message, payload })) => {
                            let waiter = pending.lock().expect("pending lock poisoned").remove(&correlation_id);
                            // No waiter: the call timed out and gave up; drop the answer.
                            if let Some(tx) = waiter {
                                let _ = tx.send(Ok((error, message, payload)));
                            }
                        }
                        Some(Ok(other)) => break format!("unexpected frame from the server: {other:?}"),
                        Some(Err(e)) => break e.to_string(),
                        None => break "the server closed the connection".to_string(),
                    }
                };
                closed.store(true, Ordering::Release);
                fail_all(&pending, target, &reason);
            })
        };
        Ok(Connection { version, tx, pending, closed, inflight: Arc::new(Semaphore::new(INFLIGHT_MAX)), tasks: [writer_task, reader_task] })
    }
}
