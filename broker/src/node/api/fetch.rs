//! `Fetch`: committed batches of a partition from an offset, long-polling when there
//! are none yet. Only the partition's serving leader answers; control entries and
//! batches the partition refused are never served.

use std::sync::Arc;

use keel_protocol::message::{self, FetchRequest, FetchResponse};

use super::{bounded, Answer, ApiError, ClientService, Request};
use crate::node::limits::{FETCH_BYTES_MAX, FETCH_WAIT_MAX};

pub async fn handle(service: Arc<ClientService>, req: Request) -> Result<Answer, ApiError> {
    let req: FetchRequest = message::decode(&req.payload)?;
    let partition = service.partition(&req.topic, req.partition)?;
    let what = format!("{}/{}", req.topic, req.partition);
    let wait = bounded(req.max_wait_ms, FETCH_WAIT_MAX);
    let read = partition.read(req.offset, u64::from(req.max_bytes.min(FETCH_BYTES_MAX)), wait).await.map_err(|error| ApiError::Partition { what, error })?;
    let head = message::encode_batches_head(&FetchResponse { high_watermark: read.high_watermark, log_start_offset: read.log_start_offset });
    Ok(Answer::WithBatches { head, batches: read.batches })
}
