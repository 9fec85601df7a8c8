//! `Produce`: validate a record batch completely, then append it through the partition.
//!
//! Every record is decoded before anything is proposed (`Partition::check_records`, in
//! the same walk that digests the message ids), so a batch any consumer would fail to
//! decode is refused (`InvalidBatch`, naming the byte offset) and never stored.
//! A producer cannot write a control batch, the producer fields must be all unset (−1)
//! or a valid idempotent stamp (id, epoch and sequence all ≥ 0), and the batch's
//! priority must be one of the topic's lanes.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use keel_protocol::batch::{NO_PRODUCER_EPOCH, NO_PRODUCER_ID, NO_SEQUENCE};
use keel_protocol::message::{self, ProduceRequest, ProduceResponse};
use keel_protocol::{BatchView, DecodeError};

use super::{bounded, ApiError, ClientService, Request};
use crate::metrics;
use crate::node::limits::{PRODUCE_TIMEOUT_MAX, SCHEDULED_DELAY_MAX};

pub async fn handle(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let started = Instant::now();
    let Request { payload, .. } = req;
    let (head, batch): (ProduceRequest, Bytes) = message::split_with_batches(&payload)?;
    // Only the batch keeps the request's buffer: stamped in place, not on a copy.
    drop(payload);
    let what = format!("{}/{}", head.topic, head.partition);
    let partition = service.partition(&head.topic, head.partition)?;
    let (topic_max, lanes) =
        service.metadata.borrow().topics.get(&head.topic).map_or((u32::MAX, u32::MAX), |t| (t.config.max_message_bytes, t.config.priorities));
    if batch.len() > topic_max as usize {
        return Err(ApiError::MessageTooLarge { topic: head.topic, size: batch.len(), max: topic_max });
    }
    let view = BatchView::parse(batch).map_err(|e| match e {
        DecodeError::BadCrc { .. } => ApiError::CorruptBatch(e),
        other => ApiError::InvalidBatch(other.to_string()),
    })?;
    check_producer_fields(&view)?;
    let priority = view.header().priority;
    if u32::from(priority) >= lanes {
        return Err(ApiError::InvalidArgument(format!(
            "priority {priority}: topic {} has priority lanes 0..{lanes} (send to one of them, or raise them with keel topic alter {} --priorities N)",
            head.topic, head.topic
        )));
    }
    if view.header().attributes.scheduled() {
        check_schedule(&view, &head.topic)?;
    }
    // One walk over the records: every one decodes, and the message ids' digests.
    let ids = partition.check_records(&view).map_err(|error| ApiError::Partition { what: what.clone(), error })?;
    let timeout = bounded(head.timeout_ms, PRODUCE_TIMEOUT_MAX);
    let bytes = view.as_bytes().len() as u64;
    let records = u64::from(view.header().record_count);
    let result = partition.append(view, ids, timeout).await;
    metrics::record_produce(&head.topic, &result, records, bytes, started.elapsed());
    let appended = result.map_err(|error| ApiError::Partition { what, error })?;
    if service.faults.take_produce_answer_drop() {
        return Err(ApiError::DropAnswer);
    }
    let resp = ProduceResponse { base_offset: appended.base_offset, record_count: appended.record_count, duplicate: appended.duplicate };
    Ok(resp.encode(req.version))
}

/// Every scheduled record's time is at most `SCHEDULED_DELAY_MAX` ahead.
fn check_schedule(view: &BatchView, topic: &str) -> Result<(), ApiError> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let latest = now.saturating_add(SCHEDULED_DELAY_MAX.as_millis() as i64);
    for record in view.records() {
        let record = record.map_err(|e| ApiError::InvalidBatch(e.to_string()))?;
        if let Some(at) = record.deliver_at_ms() {
            if at > latest {
                let ahead = std::time::Duration::from_secs(((at - now) / 1000) as u64);
                return Err(ApiError::InvalidArgument(format!(
                    "record {} of the batch to {topic} is scheduled {} ahead; at most {} (SCHEDULED_DELAY_MAX) is allowed",
                    record.offset_delta,
                    humantime::format_duration(ahead),
                    humantime::format_duration(SCHEDULED_DELAY_MAX)
                )));
            }
        }
    }
    Ok(())
}

fn check_producer_fields(view: &BatchView) -> Result<(), ApiError> {
    let h = view.header();
    if h.attributes.control() {
        return Err(ApiError::InvalidBatch("attribute bit 3 (control batch) at byte 17 is set; only brokers write control batches".into()));
    }
    let unset = h.producer_id == NO_PRODUCER_ID && h.producer_epoch == NO_PRODUCER_EPOCH && h.base_sequence == NO_SEQUENCE;
    let stamped = h.producer_id >= 0 && h.producer_epoch >= 0 && h.base_sequence >= 0;
    if !unset && !stamped {
        return Err(ApiError::InvalidBatch(format!(
            "producer fields at bytes 40..54 (id {}, epoch {}, sequence {}) must all be -1 (no idempotence) or all >= 0 (from InitProducer)",
            h.producer_id, h.producer_epoch, h.base_sequence
        )));
    }
    Ok(())
}
