//! A tokio-util codec over the sans-IO frame functions (feature `codec`). The only
//! module of this crate that names a tokio type.

use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::DecodeError;
use crate::frame::Frame;
use crate::limits::{OWN_BUFFER_FRAME_MIN, OWN_BUFFER_REMAINDER_MAX};

/// Frames a byte stream. A decode error is fatal for the connection: the caller sends
/// an error response if it can and closes.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCodec;

/// Either the stream failed or a frame was malformed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match crate::frame::check(src)? {
            // Reserve for the rest of this frame only: the length was checked against
            // FRAME_BODY_SIZE_MAX, so this never grows without bound.
            None if src.len() >= crate::frame::LENGTH_PREFIX_LEN => {
                let body_len = u32::from_le_bytes([src[0], src[1], src[2], src[3]]) as usize;
                src.reserve(crate::frame::LENGTH_PREFIX_LEN + body_len - src.len());
                Ok(None)
            }
            None => Ok(None),
            Some(total) if total >= OWN_BUFFER_FRAME_MIN && src.len() - total <= OWN_BUFFER_REMAINDER_MAX => {
                // A large frame (a produce request's batch) keeps the read buffer's
                // allocation to itself — the few bytes read past it move to a new one —
                // so the broker can later write into the batch (its offset stamp) without
                // copying it.
                let rest = BytesMut::from(&src[total..]);
                src.truncate(total);
                let mut frame = std::mem::replace(src, rest);
                frame.advance(crate::frame::LENGTH_PREFIX_LEN);
                Ok(Some(Frame::decode(frame.freeze()).map_err(|e| e.shifted(crate::frame::LENGTH_PREFIX_LEN))?))
            }
            Some(_) => Ok(Frame::split_from(src)?),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        frame.encode(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::FRAME_BODY_SIZE_MAX;
    use bytes::{BufMut, Bytes};

    #[test]
    fn a_large_frame_owns_its_buffer_and_the_bytes_read_past_it_stay_for_the_next_frame() {
        let mut codec = FrameCodec;
        let big = Frame::Request { correlation_id: 1, api_key: 2, payload: Bytes::from(vec![9u8; OWN_BUFFER_FRAME_MIN]) };
        let small = Frame::Request { correlation_id: 2, api_key: 3, payload: Bytes::from_static(b"next") };
        let mut wire = BytesMut::new();
        codec.encode(big.clone(), &mut wire).unwrap();
        codec.encode(small.clone(), &mut wire).unwrap();
        let cut = wire.len() - 3;
        let mut src = BytesMut::from(&wire[..cut]);
        let first = codec.decode(&mut src).unwrap().unwrap();
        assert_eq!(first, big);
        let Frame::Request { payload, .. } = first else { unreachable!() };
        let batch = payload.slice(100..);
        drop(payload);
        assert!(batch.try_into_mut().is_ok(), "the large frame's bytes have no other owner (the read buffer moved on)");
        assert_eq!(codec.decode(&mut src).unwrap(), None, "the next frame is not complete yet");
        src.extend_from_slice(&wire[cut..]);
        assert_eq!(codec.decode(&mut src).unwrap(), Some(small));
        assert!(src.is_empty());
    }

    #[test]
    fn codec_yields_whole_frames_and_waits_for_partial_ones() {
        let mut codec = FrameCodec;
        let mut wire = BytesMut::new();
        let request = Frame::Request { correlation_id: 7, api_key: 1, payload: Bytes::from_static(b"abc") };
        codec.encode(Frame::Hello { min_version: 1, max_version: 1 }, &mut wire).unwrap();
        codec.encode(request.clone(), &mut wire).unwrap();
        let cut = wire.len() - 2;
        let tail = wire.split_off(cut);
        assert_eq!(codec.decode(&mut wire).unwrap(), Some(Frame::Hello { min_version: 1, max_version: 1 }));
        assert_eq!(codec.decode(&mut wire).unwrap(), None, "a partial frame waits");
        wire.unsplit(tail);
        assert_eq!(codec.decode(&mut wire).unwrap(), Some(request));
        assert!(wire.is_empty());
    }

    #[test]
    fn codec_rejects_an_oversize_frame_without_buffering_its_body() {
        let mut wire = BytesMut::new();
        wire.put_u32_le(FRAME_BODY_SIZE_MAX as u32 + 1);
        let err = FrameCodec.decode(&mut wire).unwrap_err();
        assert!(matches!(err, CodecError::Decode(DecodeError::TooLarge { .. })), "{err}");
        assert!(wire.capacity() < 1024 * 1024, "no buffer was reserved for the refused body");
    }
}
