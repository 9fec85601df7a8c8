//! `ListOffsets`: the first offset whose message is at or after a time (the high
//! watermark if none is; never below the log start); `i64::MAX` asks for the end,
//! `i64::MIN` for the log start (what retention kept).

use std::sync::Arc;

use bytes::Bytes;
use keel_protocol::message::{self, ListOffsetsRequest, ListOffsetsResponse};

use super::{ApiError, ClientService, Request};

pub async fn handle(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let req: ListOffsetsRequest = message::decode(&req.payload)?;
    let partition = service.partition(&req.topic, req.partition)?;
    let what = format!("{}/{}", req.topic, req.partition);
    let offset = partition.offset_for_time(req.timestamp_ms).await.map_err(|error| ApiError::Partition { what, error })?;
    Ok(message::encode(&ListOffsetsResponse { offset }))
}
