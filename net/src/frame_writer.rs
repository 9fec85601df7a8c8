//! The write side of a connection: frames are queued, then written with vectored
//! writes. Frame headers and small payloads are packed into one buffer; a payload of
//! at least `VECTORED_PAYLOAD_MIN` bytes is written from its own `Bytes` (a record
//! batch, a fetch answer, a replication request), never copied in user space.

use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use keel_protocol::Frame;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::limits::{VECTORED_PAYLOAD_MIN, WRITE_SLICES_MAX};

/// Frames queued since the last flush, as byte pieces in wire order.
pub(crate) struct FrameWriter<W> {
    io: W,
    /// Headers and small payloads not yet cut into `pieces`.
    packed: BytesMut,
    pieces: Vec<Bytes>,
    queued: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(io: W) -> FrameWriter<W> {
        FrameWriter { io, packed: BytesMut::new(), pieces: Vec::new(), queued: 0 }
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Queues `frame` behind the frames already queued.
    pub fn feed(&mut self, frame: &Frame) {
        self.feed_with_tail(frame, &[]);
    }

    /// Queues `frame` with `tail` following its payload on the wire, as part of the
    /// same payload (the length prefix counts it): a header and the record batches
    /// after it, each sent from its own buffer.
    pub fn feed_with_tail(&mut self, frame: &Frame, tail: &[Bytes]) {
        let tail_len: usize = tail.iter().map(Bytes::len).sum();
        let before = self.packed.len();
        let payload_len = frame.encode_head_with_tail(&mut self.packed, tail_len).len();
        self.queued += self.packed.len() - before + payload_len + tail_len;
        let payload = match frame {
            Frame::Request { payload, .. } | Frame::Response { payload, .. } => payload,
            Frame::Hello { .. } | Frame::HelloAck { .. } => return,
        };
        for part in std::iter::once(payload).chain(tail) {
            if part.len() >= VECTORED_PAYLOAD_MIN {
                self.pieces.push(self.packed.split().freeze());
                self.pieces.push(part.clone());
            } else {
                self.packed.extend_from_slice(part);
            }
        }
    }

    /// Writes everything queued, then flushes the stream.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.packed.is_empty() {
            self.pieces.push(self.packed.split().freeze());
        }
        let mut first = 0;
        while first < self.pieces.len() {
            let slices: Vec<IoSlice<'_>> = self.pieces[first..].iter().take(WRITE_SLICES_MAX).map(|p| IoSlice::new(p)).collect();
            let mut written = self.io.write_vectored(&slices).await?;
            if written == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "the connection accepts no more bytes"));
            }
            while written > 0 {
                let piece = &mut self.pieces[first];
                if written >= piece.len() {
                    written -= piece.len();
                    first += 1;
                } else {
                    piece.advance(written);
                    written = 0;
                }
            }
        }
        self.pieces.clear();
        self.queued = 0;
        self.io.flush().await
    }

    /// Queues `frame` and writes it out at once.
    pub async fn send(&mut self, frame: &Frame) -> io::Result<()> {
        self.feed(frame);
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_protocol::ErrorCode;

    /// A sink that accepts at most `step` bytes per write, to force partial writes.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(mut self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(mut self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>, bufs: &[IoSlice<'_>]) -> std::task::Poll<io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.step - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
                if n == self.step {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn vectored_writes_put_exactly_the_encoded_frames_on_the_wire_even_when_partial() {
        let frames = vec![
            Frame::Hello { min_version: 1, max_version: 1 },
            Frame::Request { correlation_id: 1, api_key: 2, payload: Bytes::from(vec![7u8; 100]) },
            Frame::Request { correlation_id: 2, api_key: 2, payload: Bytes::from(vec![9u8; VECTORED_PAYLOAD_MIN * 3 + 5]) },
            Frame::Response { correlation_id: 2, error: ErrorCode::None, message: "m".into(), payload: Bytes::from(vec![1u8; VECTORED_PAYLOAD_MIN]) },
            Frame::Response { correlation_id: 3, error: ErrorCode::None, message: String::new(), payload: Bytes::new() },
        ];
        let mut expected = BytesMut::new();
        for f in &frames {
            f.encode(&mut expected);
        }
        for step in [1, 7, 4096, usize::MAX / 2] {
            let mut w = FrameWriter::new(Trickle { out: Vec::new(), step });
            for f in &frames {
                w.feed(f);
            }
            assert_eq!(w.queued(), expected.len());
            w.flush().await.unwrap();
            assert_eq!(w.queued(), 0);
            assert!(w.io.out == expected[..], "step {step}: the wire bytes differ from the frames' encoding");
        }
    }

    #[tokio::test]
    async fn a_frame_fed_with_a_tail_is_on_the_wire_exactly_as_the_frame_of_its_joined_payload() {
        let head = Bytes::from(vec![3u8; 40]);
        let tail =
            vec![Bytes::from(vec![5u8; VECTORED_PAYLOAD_MIN + 1]), Bytes::from(vec![6u8; 10]), Bytes::new(), Bytes::from(vec![7u8; VECTORED_PAYLOAD_MIN * 2])];
        let joined: Vec<u8> = std::iter::once(&head).chain(&tail).flat_map(|b| b.iter().copied()).collect();
        let mut expected = BytesMut::new();
        Frame::Request { correlation_id: 9, api_key: 4, payload: Bytes::from(joined.clone()) }.encode(&mut expected);
        Frame::Response { correlation_id: 9, error: ErrorCode::None, message: "x".into(), payload: Bytes::from(joined) }.encode(&mut expected);
        for step in [1, 13, usize::MAX / 2] {
            let mut w = FrameWriter::new(Trickle { out: Vec::new(), step });
            w.feed_with_tail(&Frame::Request { correlation_id: 9, api_key: 4, payload: head.clone() }, &tail);
            w.feed_with_tail(&Frame::Response { correlation_id: 9, error: ErrorCode::None, message: "x".into(), payload: head.clone() }, &tail);
            assert_eq!(w.queued(), expected.len());
            w.flush().await.unwrap();
            assert!(w.io.out == expected[..], "step {step}: a frame with a tail differs from the frame of its joined payload");
        }
    }
}
