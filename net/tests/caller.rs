//! `Caller` against a scripted server: answers routed by correlation id whatever their
//! order, timeouts that do not poison the connection.

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use keel_net::{CallError, Caller};
use keel_protocol::codec::FrameCodec;
use keel_protocol::{ErrorCode, Frame};
use tokio::net::TcpListener;
use tokio_util::codec::Framed;

/// A server that answers every request by echoing its payload, holding back any
/// request whose payload starts with `b'S'` (slow) until a later request arrives, and
/// never answering payloads starting with `b'X'`.
async fn scripted_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut framed = Framed::new(stream, FrameCodec);
        let Some(Ok(Frame::Hello { .. })) = framed.next().await else { return };
        framed.send(Frame::HelloAck { version: 1 }).await.unwrap();
        let mut held: Vec<(u64, Bytes)> = Vec::new();
        while let Some(Ok(Frame::Request { correlation_id, payload, .. })) = framed.next().await {
            match payload.first() {
                Some(b'S') => held.push((correlation_id, payload)),
                Some(b'X') => {}
                _ => {
                    framed.send(Frame::Response { correlation_id, error: ErrorCode::None, message: String::new(), payload }).await.unwrap();
                    for (id, p) in held.drain(..) {
                        framed.send(Frame::Response { correlation_id: id, error: ErrorCode::None, message: String::new(), payload: p }).await.unwrap();
                    }
                }
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_arriving_out_of_order_reach_the_right_callers() {
    let caller = std::sync::Arc::new(Caller::new(9, scripted_server().await, None));
    let slow = {
        let caller = caller.clone();
        tokio::spawn(async move { caller.call(1, Bytes::from_static(b"S-first"), Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fast = caller.call(1, Bytes::from_static(b"F-second"), Duration::from_secs(5)).await.unwrap();
    assert_eq!(fast, Bytes::from_static(b"F-second"));
    assert_eq!(slow.await.unwrap().unwrap(), Bytes::from_static(b"S-first"), "the held answer, sent after the later one, found its caller");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_call_fails_alone_and_the_connection_keeps_working() {
    let caller = Caller::new(9, scripted_server().await, None);
    let err = caller.call(1, Bytes::from_static(b"X-never"), Duration::from_millis(200)).await.unwrap_err();
    assert!(matches!(err, CallError::Timeout { target: 9, .. }), "{err:?}");
    let ok = caller.call(1, Bytes::from_static(b"after"), Duration::from_secs(5)).await.unwrap();
    assert_eq!(ok, Bytes::from_static(b"after"));
}

#[tokio::test]
async fn a_call_to_a_closed_port_is_unreachable_with_the_address() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let err = Caller::new(4, addr.clone(), None).call(1, Bytes::new(), Duration::from_secs(2)).await.unwrap_err();
    match err {
        CallError::Unreachable { target: 4, addr: a, refused, .. } => {
            assert_eq!(a, addr);
            assert!(refused, "nothing listens there: the connection was refused");
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

/// After a failed connect, calls within `RECONNECT_BACKOFF` fail at once with that
/// failure instead of connecting again (every Raft group replicating to a dead peer
/// calls it); the first call after the backoff connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_right_after_a_failed_connect_fail_without_connecting_again() {
    use keel_net::limits::RECONNECT_BACKOFF;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let caller = Caller::new(4, addr.clone(), None);
    let failed_at = tokio::time::Instant::now();
    assert!(matches!(caller.call(1, Bytes::new(), Duration::from_secs(2)).await, Err(CallError::Unreachable { .. })));
    // The port listens again, but the caller does not try it within the backoff.
    let listener = TcpListener::bind(&addr).await.unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = accepted.clone();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        seen.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut framed = Framed::new(stream, FrameCodec);
        let Some(Ok(Frame::Hello { .. })) = framed.next().await else { return };
        framed.send(Frame::HelloAck { version: 1 }).await.unwrap();
        while let Some(Ok(Frame::Request { correlation_id, payload, .. })) = framed.next().await {
            framed.send(Frame::Response { correlation_id, error: ErrorCode::None, message: String::new(), payload }).await.unwrap();
        }
    });
    let again = caller.call(1, Bytes::new(), Duration::from_secs(2)).await;
    if failed_at.elapsed() < RECONNECT_BACKOFF {
        assert!(matches!(again, Err(CallError::Unreachable { .. })), "within the backoff: {again:?}");
        assert!(!accepted.load(std::sync::atomic::Ordering::SeqCst), "no connection attempted within the backoff");
    }
    tokio::time::sleep_until(failed_at + RECONNECT_BACKOFF).await;
    let ok = caller.call(1, Bytes::from_static(b"after"), Duration::from_secs(2)).await.unwrap();
    assert_eq!(ok, Bytes::from_static(b"after"));
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst));
}
