//! The serving side: a listener whose connections do the version handshake, an
//! optional identification check, then answer requests through a [`Service`], many at
//! once (bounded), in whatever order they finish.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use keel_protocol::codec::FrameCodec;
use keel_protocol::frame::negotiate_version;
use keel_protocol::limits::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use keel_protocol::{ErrorCode, Frame};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::codec::FramedRead;

use crate::frame_writer::FrameWriter;
use crate::limits::WRITE_GATHER_BYTES_MAX;

/// An answer to one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub error: ErrorCode,
    /// What failed and what to do, for a non-`None` error.
    pub message: String,
    pub payload: Bytes,
    /// More of the payload, after `payload`, each part written from its own buffer
    /// (record batches after their header: no copy into one answer buffer).
    pub tail: Vec<Bytes>,
    /// Send nothing and close the connection (fault injection: a lost answer).
    pub close_connection: bool,
}

impl Reply {
    pub fn ok(payload: Bytes) -> Reply {
        Reply { error: ErrorCode::None, message: String::new(), payload, tail: Vec::new(), close_connection: false }
    }

    /// Success with a payload made of `head` followed by the `tail` parts.
    pub fn ok_with_tail(head: Bytes, tail: Vec<Bytes>) -> Reply {
        Reply { tail, ..Reply::ok(head) }
    }

    pub fn error(error: ErrorCode, message: impl Into<String>) -> Reply {
        Reply { error, message: message.into(), payload: Bytes::new(), tail: Vec::new(), close_connection: false }
    }

    /// An error with a body giving details (e.g. `NotLeader`'s leader address).
    pub fn error_with(error: ErrorCode, message: impl Into<String>, payload: Bytes) -> Reply {
        Reply { error, message: message.into(), payload, tail: Vec::new(), close_connection: false }
    }

    /// No answer: the connection is closed instead, as if the answer had been lost.
    pub fn close_connection() -> Reply {
        Reply { close_connection: true, ..Reply::ok(Bytes::new()) }
    }
}

/// What a listener serves.
pub trait Service: Send + Sync + 'static {
    /// Answers one request. Runs concurrently with the connection's other requests.
    /// `caller` is what [`Service::identify`] returned for this connection (`None` when
    /// the service does not identify connections); `version` is the protocol version
    /// the connection negotiated, which decides how versioned bodies are read and written.
    fn call(self: Arc<Self>, caller: Option<u64>, version: u16, api_key: u16, payload: Bytes) -> BoxFuture<'static, Reply>;

    /// If `Some(key)`, the first request on every connection must carry this api key
    /// and pass [`Service::identify`]; otherwise the connection is refused and closed.
    fn identify_api(&self) -> Option<u16> {
        None
    }

    /// Checks the identification request (see [`Service::identify_api`]) and returns
    /// the caller's id, handed to every [`Service::call`] on the connection.
    fn identify(&self, _payload: &Bytes) -> Result<u64, Reply> {
        Err(Reply::error(ErrorCode::UnsupportedApi, "this listener does not identify connections"))
    }
}

/// Per-connection bounds of a listener.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Requests one connection processes at once. Full: the reader stops reading
    /// (TCP backpressure to the sender).
    pub concurrency_max: usize,
    /// Answers queued for one connection's writer. Full: handlers wait.
    pub send_queue_capacity: usize,
    /// Connections served at once. Full: accepting pauses until one closes.
    pub connections_max: usize,
}

/// A running listener. Dropping it closes the listener and every connection.
pub struct Listener {
    local_addr: SocketAddr,
    accept_task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl Listener {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// Binds `addr` and serves `service` until the returned `Listener` is dropped.
pub async fn listen(addr: &str, service: Arc<dyn Service>, options: ServeOptions) -> std::io::Result<Listener> {
    assert!(options.concurrency_max > 0 && options.send_queue_capacity > 0 && options.connections_max > 0, "serve options must be positive");
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    let accept_task = tokio::spawn(async move {
        // Dropping this set (when the accept task is aborted) aborts every connection.
        let mut connections = JoinSet::new();
        let slots = Arc::new(Semaphore::new(options.connections_max));
        loop {
            let permit = slots.clone().acquire_owned().await.expect("the connection semaphore is never closed");
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let service = service.clone();
                        connections.spawn(async move {
                            if let Err(reason) = serve(stream, service, options).await {
                                tracing::debug!(%peer, %reason, "connection ended");
                            }
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
            while connections.try_join_next().is_some() {}
        }
    });
    Ok(Listener { local_addr, accept_task })
}

fn answer(correlation_id: u64, reply: Reply) -> Frame {
    Frame::Response { correlation_id, error: reply.error, message: reply.message, payload: reply.payload }
}

/// An answer and the rest of its payload, as queued for a connection's writer.
fn answer_with_tail(correlation_id: u64, mut reply: Reply) -> (Frame, Vec<Bytes>) {
    let tail = std::mem::take(&mut reply.tail);
    (answer(correlation_id, reply), tail)
}

async fn serve(stream: TcpStream, service: Arc<dyn Service>, options: ServeOptions) -> Result<(), String> {
    crate::socket::configure(&stream).map_err(|e| e.to_string())?;
    let (r, w) = stream.into_split();
    let mut reader = FramedRead::new(r, FrameCodec);
    let mut writer = FrameWriter::new(w);

    let version = match reader.next().await {
        Some(Ok(Frame::Hello { min_version, max_version })) => match negotiate_version(min_version, max_version) {
            Ok(version) => {
                writer.send(&Frame::HelloAck { version }).await.map_err(|e| e.to_string())?;
                version
            }
            Err(code) => {
                let msg = format!("this server speaks protocol versions {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION_MAX}");
                let _ = writer.send(&answer(0, Reply::error(code, msg))).await;
                return Err("no common protocol version".into());
            }
        },
        Some(Err(e)) => {
            let _ = writer.send(&answer(0, Reply::error(ErrorCode::MalformedFrame, e.to_string()))).await;
            return Err(e.to_string());
        }
        other => {
            let _ = writer.send(&answer(0, Reply::error(ErrorCode::MalformedFrame, "the first frame must be Hello"))).await;
            return Err(format!("bad first frame: {other:?}"));
        }
    };
    let mut caller = None;
    if let Some(identify_api) = service.identify_api() {
        match reader.next().await {
            Some(Ok(Frame::Request { correlation_id, api_key, payload })) if api_key == identify_api => match service.identify(&payload) {
                Ok(id) => {
                    caller = Some(id);
                    writer.send(&answer(correlation_id, Reply::ok(Bytes::new()))).await.map_err(|e| e.to_string())?
                }
                Err(refusal) => {
                    let reason = refusal.message.clone();
                    let _ = writer.send(&answer(correlation_id, refusal)).await;
                    return Err(reason);
                }
            },
            other => {
                let _ = writer.send(&answer(0, Reply::error(ErrorCode::InvalidRequest, "identify first"))).await;
                return Err(format!("no identification: {other:?}"));
            }
        }
    }

    let (tx, mut rx) = mpsc::channel::<(Frame, Vec<Bytes>)>(options.send_queue_capacity);
    let writer_task = tokio::spawn(async move {
        while let Some((frame, tail)) = rx.recv().await {
            writer.feed_with_tail(&frame, &tail);
            // Gather whatever else is queued into the same write, up to a bound.
            while writer.queued() < WRITE_GATHER_BYTES_MAX {
                let Ok((frame, tail)) = rx.try_recv() else { break };
                writer.feed_with_tail(&frame, &tail);
            }
            writer.flush().await?;
        }
        Ok::<(), std::io::Error>(())
    });
    let limit = Arc::new(Semaphore::new(options.concurrency_max));
    let mut handlers = JoinSet::new();
    let close = Arc::new(tokio::sync::Notify::new());
    let result = loop {
        let next = tokio::select! {
            next = reader.next() => next,
            _ = close.notified() => break Err("a handler dropped its answer and closed the connection".into()),
        };
        let frame = match next {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                let _ = tx.send(answer_with_tail(0, Reply::error(ErrorCode::MalformedFrame, e.to_string()))).await;
                break Err(e.to_string());
            }
            None => break Ok(()),
        };
        let Frame::Request { correlation_id, api_key, payload } = frame else {
            let _ = tx.send(answer_with_tail(0, Reply::error(ErrorCode::MalformedFrame, "only requests are accepted after the handshake"))).await;
            break Err("a non-request frame after the handshake".into());
        };
        let permit = limit.clone().acquire_owned().await.expect("the limit semaphore is never closed");
        let (service, tx, close) = (service.clone(), tx.clone(), close.clone());
        handlers.spawn(async move {
            let reply = service.call(caller, version, api_key, payload).await;
            if reply.close_connection {
                close.notify_one();
            } else {
                let _ = tx.send(answer_with_tail(correlation_id, reply)).await;
            }
            drop(permit);
        });
        while handlers.try_join_next().is_some() {}
    };
    drop(tx);
    handlers.shutdown().await;
    let _ = writer_task.await;
    result
}
