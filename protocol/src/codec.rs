//! A tokio-util codec over the sans-IO frame functions (feature `codec`). The only
//! module of this crate that names a tokio type.

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use crate::error::DecodeError;
use crate::frame::Frame;

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
