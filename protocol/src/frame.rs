//! Frames: the length-delimited envelopes every connection speaks.
//!
//! ```text
//! frame    := body_len:u32le body[body_len]           body_len in 1..=FRAME_BODY_SIZE_MAX
//! body     := kind:u8 …
//!   Hello    (1) := magic:u32le "KEEL" min_version:u16le max_version:u16le
//!   HelloAck (2) := version:u16le
//!   Request  (3) := correlation_id:u64le api_key:u16le payload…
//!   Response (4) := correlation_id:u64le error_code:u16le msg_len:u16le msg[msg_len] payload…
//! ```
//!
//! Decoding is in two steps, as in mini-redis: [`check`] looks at the length prefix
//! only (is a whole frame here, and is it within limits?) so a reader knows how much to
//! buffer and can refuse an oversize frame before reading its body; [`Frame::decode`]
//! then parses a body that is known to be complete. Payloads are `Bytes` slices of the
//! body: nothing is copied.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, ErrorCode};
use crate::limits::{ERROR_MESSAGE_SIZE_MAX, FRAME_BODY_SIZE_MAX, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;
/// `"KEEL"` as a little-endian u32: the first thing a client sends.
pub const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"KEEL");

const KIND_HELLO: u8 = 1;
const KIND_HELLO_ACK: u8 = 2;
const KIND_REQUEST: u8 = 3;
const KIND_RESPONSE: u8 = 4;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client → server, first frame on a connection: the versions the client speaks.
    Hello { min_version: u16, max_version: u16 },
    /// Server → client: the version both sides will use.
    HelloAck { version: u16 },
    /// A request; `api_key` names the operation, `payload` is its body.
    Request { correlation_id: u64, api_key: u16, payload: Bytes },
    /// The answer to the request with the same correlation id.
    Response { correlation_id: u64, error: ErrorCode, message: String, payload: Bytes },
}

/// Looks at the start of `buf`: `Ok(Some(n))` if a whole frame of `n` bytes (prefix
/// included) is present, `Ok(None)` if more bytes are needed, `Err` if the declared
/// length is zero or above [`FRAME_BODY_SIZE_MAX`] (the connection should be closed).
pub fn check(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    let Some(prefix) = buf.get(..LENGTH_PREFIX_LEN) else {
        return Ok(None);
    };
    let body_len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if body_len == 0 {
        return Err(DecodeError::Invalid { offset: 0, what: "frame length", reason: "a frame body is at least one byte" });
    }
    if body_len > FRAME_BODY_SIZE_MAX {
        return Err(DecodeError::TooLarge { offset: 0, what: "frame body", size: body_len as u64, max: FRAME_BODY_SIZE_MAX as u64 });
    }
    let total = LENGTH_PREFIX_LEN + body_len;
    Ok((buf.len() >= total).then_some(total))
}

impl Frame {
    /// Decodes a frame body (without its length prefix). Error offsets count from the
    /// start of the body.
    pub fn decode(body: Bytes) -> Result<Frame, DecodeError> {
        let mut r = Reader { buf: &body, pos: 0 };
        let kind = r.u8()?;
        let frame = match kind {
            KIND_HELLO => {
                let magic = r.u32()?;
                if magic != HELLO_MAGIC {
                    return Err(DecodeError::Unknown { offset: 1, what: "hello magic", value: u64::from(magic) });
                }
                let min_version = r.u16()?;
                let max_version = r.u16()?;
                if min_version > max_version {
                    return Err(DecodeError::Invalid { offset: 5, what: "hello versions", reason: "min_version above max_version" });
                }
                Frame::Hello { min_version, max_version }
            }
            KIND_HELLO_ACK => Frame::HelloAck { version: r.u16()? },
            KIND_REQUEST => {
                let correlation_id = r.u64()?;
                let api_key = r.u16()?;
                Frame::Request { correlation_id, api_key, payload: body.slice(r.pos..) }
            }
            KIND_RESPONSE => {
                let correlation_id = r.u64()?;
                let error = ErrorCode::from_code(r.u16()?);
                let msg_at = r.pos;
                let msg_len = r.u16()? as usize;
                if msg_len > ERROR_MESSAGE_SIZE_MAX {
                    return Err(DecodeError::TooLarge { offset: msg_at, what: "error message", size: msg_len as u64, max: ERROR_MESSAGE_SIZE_MAX as u64 });
                }
                let msg = r.bytes(msg_len)?;
                let message =
                    std::str::from_utf8(msg).map_err(|_| DecodeError::Invalid { offset: msg_at + 2, what: "error message", reason: "not UTF-8" })?.to_owned();
                Frame::Response { correlation_id, error, message, payload: body.slice(r.pos..) }
            }
            other => return Err(DecodeError::Unknown { offset: 0, what: "frame kind", value: u64::from(other) }),
        };
        if matches!(frame, Frame::Hello { .. } | Frame::HelloAck { .. }) && r.pos != body.len() {
            return Err(DecodeError::Invalid { offset: r.pos, what: "handshake frame", reason: "trailing bytes" });
        }
        Ok(frame)
    }

    /// Decodes one whole frame (prefix included) from the front of `buf`, removing it.
    /// `Ok(None)`: more bytes are needed. Error offsets count from the start of the frame.
    pub fn split_from(buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some(total) = check(buf)? else {
            return Ok(None);
        };
        let mut frame = buf.split_to(total);
        frame.advance(LENGTH_PREFIX_LEN);
        Frame::decode(frame.freeze()).map(Some).map_err(|e| e.shifted(LENGTH_PREFIX_LEN))
    }

    /// Appends the frame, length prefix included, to `dst`. A response message longer
    /// than [`ERROR_MESSAGE_SIZE_MAX`] is cut at a UTF-8 boundary.
    pub fn encode(&self, dst: &mut BytesMut) {
        let payload = self.encode_head(dst);
        dst.put_slice(payload);
    }

    /// Appends everything of the frame but its payload to `dst` (the length prefix
    /// counts the payload) and returns the payload, which must follow on the wire: a
    /// writer can send it from where it lies instead of copying it.
    pub fn encode_head(&self, dst: &mut BytesMut) -> &[u8] {
        self.encode_head_with_tail(dst, 0)
    }

    /// Like [`Frame::encode_head`], for a request or response whose payload continues
    /// with `tail_len` more bytes after `payload` (written from elsewhere, e.g. record
    /// batches after their header): the length prefix counts them.
    pub fn encode_head_with_tail(&self, dst: &mut BytesMut, tail_len: usize) -> &[u8] {
        let start = dst.len();
        dst.put_u32_le(0);
        let payload: &[u8] = match self {
            Frame::Hello { min_version, max_version } => {
                dst.put_u8(KIND_HELLO);
                dst.put_u32_le(HELLO_MAGIC);
                dst.put_u16_le(*min_version);
                dst.put_u16_le(*max_version);
                &[]
            }
            Frame::HelloAck { version } => {
                dst.put_u8(KIND_HELLO_ACK);
                dst.put_u16_le(*version);
                &[]
            }
            Frame::Request { correlation_id, api_key, payload } => {
                dst.put_u8(KIND_REQUEST);
                dst.put_u64_le(*correlation_id);
                dst.put_u16_le(*api_key);
                payload
            }
            Frame::Response { correlation_id, error, message, payload } => {
                dst.put_u8(KIND_RESPONSE);
                dst.put_u64_le(*correlation_id);
                dst.put_u16_le(error.as_code());
                let msg = truncate_utf8(message, ERROR_MESSAGE_SIZE_MAX);
                dst.put_u16_le(msg.len() as u16);
                dst.put_slice(msg.as_bytes());
                payload
            }
        };
        let body_len = (dst.len() - start - LENGTH_PREFIX_LEN + payload.len() + tail_len) as u32;
        dst[start..start + LENGTH_PREFIX_LEN].copy_from_slice(&body_len.to_le_bytes());
        payload
    }
}

/// The version a server picks for a client's `Hello`: the newest both speak.
pub fn negotiate_version(client_min: u16, client_max: u16) -> Result<u16, ErrorCode> {
    let low = client_min.max(PROTOCOL_VERSION_MIN);
    let high = client_max.min(PROTOCOL_VERSION_MAX);
    if low <= high {
        Ok(high)
    } else {
        Err(ErrorCode::UnsupportedVersion)
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A bounds-checked little-endian cursor whose errors carry the failing offset.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let have = self.buf.len() - self.pos;
        if have < n {
            return Err(DecodeError::Truncated { offset: self.pos, need: n - have, have });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame_strategy() -> impl Strategy<Value = Frame> {
        let payload = proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
        prop_oneof![
            (0u16..10, 0u16..10).prop_map(|(a, b)| Frame::Hello { min_version: a.min(b), max_version: a.max(b) }),
            any::<u16>().prop_map(|version| Frame::HelloAck { version }),
            (any::<u64>(), any::<u16>(), payload.clone()).prop_map(|(correlation_id, api_key, payload)| Frame::Request { correlation_id, api_key, payload }),
            (any::<u64>(), proptest::sample::select(ErrorCode::ALL.to_vec()), ".{0,40}", payload)
                .prop_map(|(correlation_id, error, message, payload)| Frame::Response { correlation_id, error, message, payload }),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip_through_encode_and_split(frames in proptest::collection::vec(frame_strategy(), 1..8)) {
            let mut buf = BytesMut::new();
            for f in &frames {
                f.encode(&mut buf);
            }
            for f in &frames {
                prop_assert_eq!(&Frame::split_from(&mut buf).unwrap().unwrap(), f);
            }
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn a_frame_split_at_any_point_waits_for_the_rest(f in frame_strategy(), cut in 0usize..400) {
            let mut full = BytesMut::new();
            f.encode(&mut full);
            let cut = cut % full.len();
            let mut partial = BytesMut::from(&full[..cut]);
            prop_assert_eq!(Frame::split_from(&mut partial).unwrap(), None);
            prop_assert_eq!(partial.len(), cut, "an incomplete frame is left in the buffer");
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_frame_decoder(raw in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&raw[..]);
            let _ = Frame::split_from(&mut buf);
            let _ = Frame::decode(Bytes::from(raw));
        }
    }

    #[test]
    fn an_oversize_length_prefix_is_refused_before_the_body_arrives() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(FRAME_BODY_SIZE_MAX as u32 + 1);
        let err = Frame::split_from(&mut buf).unwrap_err();
        assert_eq!(err, DecodeError::TooLarge { offset: 0, what: "frame body", size: FRAME_BODY_SIZE_MAX as u64 + 1, max: FRAME_BODY_SIZE_MAX as u64 });
    }

    #[test]
    fn a_zero_length_frame_is_invalid() {
        assert!(matches!(check(&[0, 0, 0, 0]), Err(DecodeError::Invalid { offset: 0, .. })));
    }

    #[test]
    fn an_unknown_frame_kind_is_reported_after_the_prefix() {
        let mut buf = BytesMut::from(&[1u8, 0, 0, 0, 99][..]);
        assert_eq!(Frame::split_from(&mut buf).unwrap_err(), DecodeError::Unknown { offset: 4, what: "frame kind", value: 99 });
    }

    #[test]
    fn a_hello_with_the_wrong_magic_is_rejected() {
        let mut body = BytesMut::new();
        body.put_u8(KIND_HELLO);
        body.put_u32_le(0xdead_beef);
        body.put_u16_le(1);
        body.put_u16_le(1);
        assert!(matches!(Frame::decode(body.freeze()), Err(DecodeError::Unknown { offset: 1, what: "hello magic", .. })));
    }

    #[test]
    fn a_truncated_request_header_names_the_missing_bytes() {
        let body = Bytes::from_static(&[KIND_REQUEST, 1, 2, 3]);
        assert_eq!(Frame::decode(body), Err(DecodeError::Truncated { offset: 1, need: 5, have: 3 }));
    }

    #[test]
    fn version_negotiation_picks_the_newest_common_version_or_refuses() {
        assert_eq!(negotiate_version(1, 9), Ok(PROTOCOL_VERSION_MAX));
        assert_eq!(negotiate_version(PROTOCOL_VERSION_MAX + 1, PROTOCOL_VERSION_MAX + 5), Err(ErrorCode::UnsupportedVersion));
        assert_eq!(negotiate_version(0, 0), Err(ErrorCode::UnsupportedVersion));
    }

    #[test]
    fn an_overlong_error_message_is_cut_on_a_character_boundary() {
        let message = "é".repeat(ERROR_MESSAGE_SIZE_MAX);
        let mut buf = BytesMut::new();
        Frame::Response { correlation_id: 1, error: ErrorCode::Unknown, message, payload: Bytes::new() }.encode(&mut buf);
        let Some(Frame::Response { message, .. }) = Frame::split_from(&mut buf).unwrap() else { panic!("not a response") };
        assert!(message.len() <= ERROR_MESSAGE_SIZE_MAX && message.len() >= ERROR_MESSAGE_SIZE_MAX - 1);
    }
}
