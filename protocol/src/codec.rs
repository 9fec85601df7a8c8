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
