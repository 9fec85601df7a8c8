//! Bodies of the client APIs (`api::client`).
//!
//! Control bodies are postcard-encoded structs. Produce requests and fetch responses
//! carry record batches, which must not be re-encoded: their payload is
//! `header_len:u32le | postcard(header) | batches…`, so the batches are `Bytes` slices of
//! the frame (`split_with_batches`). A fetch response holds zero or more whole batches
//! back to back; each is self-delimiting through its length field.

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::batch::{batch_size, BatchView};
use crate::error::DecodeError;
use crate::limits::FRAME_BODY_SIZE_MAX;

/// Encodes a control body.
pub fn encode<T: Serialize>(body: &T) -> Bytes {
    Bytes::from(postcard::to_allocvec(body).expect("postcard encodes every message type to a Vec"))
}

/// Decodes a control body; the whole payload must be consumed.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) = postcard::take_from_bytes(payload).map_err(|_| DecodeError::Invalid {
        offset: 0,
        what: "message body",
        reason: "does not decode as the expected message",
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::Invalid { offset: payload.len() - rest.len(), what: "message body", reason: "trailing bytes" });
    }
    Ok(value)
}

/// `header_len | header | batches` for a produce request or a fetch response.
pub fn encode_with_batches<T: Serialize>(header: &T, batches: &[Bytes]) -> Bytes {
    let head = postcard::to_allocvec(header).expect("postcard encodes every message type to a Vec");
    let total = 4 + head.len() + batches.iter().map(Bytes::len).sum::<usize>();
    let mut buf = BytesMut::with_capacity(total);
    buf.put_u32_le(head.len() as u32);
    buf.put_slice(&head);
    for b in batches {
        buf.put_slice(b);
    }
    buf.freeze()
}

/// Splits a `header_len | header | batches` payload: the decoded header and the batch
/// bytes (a slice of `payload`, not a copy).
pub fn split_with_batches<T: DeserializeOwned>(payload: &Bytes) -> Result<(T, Bytes), DecodeError> {
    let Some(len) = payload.get(..4) else {
        return Err(DecodeError::Truncated { offset: payload.len(), need: 4 - payload.len(), have: payload.len() });
    };
    let head_len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if head_len > FRAME_BODY_SIZE_MAX {
        return Err(DecodeError::TooLarge { offset: 0, what: "message header", size: head_len as u64, max: FRAME_BODY_SIZE_MAX as u64 });
    }
    let Some(head) = payload.get(4..4 + head_len) else {
        return Err(DecodeError::Truncated { offset: payload.len(), need: 4 + head_len - payload.len(), have: payload.len() - 4 });
    };
    let header = decode(head).map_err(|e| e.shifted(4))?;
    Ok((header, payload.slice(4 + head_len..)))
}

/// Splits back-to-back batches into validated views (header, length and CRC checked).
pub fn split_batches(mut bytes: Bytes) -> Result<Vec<BatchView>, DecodeError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while !bytes.is_empty() {
        let Some(size) = batch_size(&bytes).map_err(|e| e.shifted(at))? else {
            return Err(DecodeError::Truncated { offset: at + bytes.len(), need: 12 - bytes.len(), have: bytes.len() });
        };
        if size > bytes.len() {
            return Err(DecodeError::Truncated { offset: at + bytes.len(), need: size - bytes.len(), have: bytes.len() });
        }
        let batch = bytes.split_to(size);
        out.push(BatchView::parse(batch).map_err(|e| e.shifted(at))?);
        at += size;
    }
    Ok(out)
}

/// Header of a produce request; the batch follows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProduceRequest {
    pub topic: String,
    pub partition: u32,
    /// How long the broker may wait for the commit before answering `RequestTimedOut`.
    pub timeout_ms: u32,
}

/// Where the produced batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProduceResponse {
    pub base_offset: u64,
    pub record_count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub topic: String,
    pub partition: u32,
    /// First offset wanted; the response starts with the batch containing it.
    pub offset: u64,
    /// Stop adding batches past this many bytes (at least one batch is returned).
    pub max_bytes: u32,
    /// Wait up to this long for data when none is available at `offset`.
    pub max_wait_ms: u32,
}

/// Header of a fetch response; whole batches follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchResponse {
    /// Messages below this offset are committed.
    pub high_watermark: u64,
    /// The first offset still retained.
    pub log_start_offset: u64,
}

/// Details of a `NotLeader` answer, so the client can go straight to the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotLeader {
    pub leader_id: Option<u64>,
    pub leader_addr: Option<String>,
}

/// Details of a `Throttled` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttled {
    pub retry_after_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MetadataRequest {
    /// `None`: every topic.
    pub topics: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerInfo {
    pub id: u64,
    /// Client listener address.
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub partition: u32,
    pub replicas: Vec<u64>,
    pub leader: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicInfo {
    pub name: String,
    pub partitions: Vec<PartitionInfo>,
    pub retention_ms: Option<u64>,
    pub max_message_bytes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataResponse {
    pub brokers: Vec<BrokerInfo>,
    pub topics: Vec<TopicInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateTopicRequest {
    pub name: String,
    pub partitions: u32,
    pub replicas: u16,
    pub retention_ms: Option<u64>,
    pub max_message_bytes: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteTopicRequest {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListOffsetsRequest {
    pub topic: String,
    pub partition: u32,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListOffsetsResponse {
    /// The first offset whose message is at or after the timestamp, or the high
    /// watermark if none is.
    pub offset: u64,
}

/// One node's view of the Raft groups it hosts (`api::client::CLUSTER_STATUS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatusResponse {
    pub node: u64,
    pub groups: Vec<GroupStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: u64,
    /// `None` for the metadata group.
    pub topic: Option<String>,
    pub partition: Option<u32>,
    /// "leader", "follower", "candidate", "learner" or "shutdown".
    pub role: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub high_watermark: u64,
    /// On the leader: each replica's matched log index.
    pub matched: Vec<(u64, Option<u64>)>,
    /// The group's voters.
    pub replicas: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, BatchOptions, NewRecord};

    fn batch(values: &[&str]) -> Bytes {
        let mut b = BatchBuilder::new(BatchOptions::default()).unwrap();
        for v in values {
            b.push(NewRecord { timestamp_ms: 5, value: Some(v.as_bytes()), ..NewRecord::default() }).unwrap();
        }
        b.finish().unwrap()
    }

    #[test]
    fn a_produce_request_carries_its_batch_as_a_slice_of_the_payload() {
        let req = ProduceRequest { topic: "orders".into(), partition: 2, timeout_ms: 5000 };
        let b = batch(&["a", "b"]);
        let payload = encode_with_batches(&req, std::slice::from_ref(&b));
        let (got, tail): (ProduceRequest, Bytes) = split_with_batches(&payload).unwrap();
        assert_eq!(got, req);
        assert_eq!(tail, b);
        assert_eq!(tail.as_ptr(), payload[payload.len() - b.len()..].as_ptr(), "no copy: the batch points into the payload");
    }

    #[test]
    fn a_fetch_response_splits_into_its_batches() {
        let batches = vec![batch(&["a"]), batch(&["b", "c"]), batch(&["d"])];
        let payload = encode_with_batches(&FetchResponse { high_watermark: 4, log_start_offset: 0 }, &batches);
        let (head, tail): (FetchResponse, Bytes) = split_with_batches(&payload).unwrap();
        assert_eq!(head.high_watermark, 4);
        let views = split_batches(tail).unwrap();
        assert_eq!(views.iter().map(|v| v.header().record_count).collect::<Vec<_>>(), vec![1, 2, 1]);
    }

    #[test]
    fn a_truncated_batch_in_a_fetch_response_is_reported_with_its_offset() {
        let batches = vec![batch(&["a"]), batch(&["b"])];
        let mut joined = BytesMut::new();
        for b in &batches {
            joined.put_slice(b);
        }
        let cut = joined.len() - 3;
        let err = split_batches(joined.freeze().slice(..cut)).unwrap_err();
        assert!(matches!(err, DecodeError::Truncated { offset, .. } if offset == cut), "{err:?}");
    }

    #[test]
    fn control_bodies_round_trip_and_reject_trailing_bytes() {
        let req = CreateTopicRequest { name: "t".into(), partitions: 3, replicas: 3, retention_ms: Some(60_000), max_message_bytes: None };
        let bytes = encode(&req);
        assert_eq!(decode::<CreateTopicRequest>(&bytes).unwrap(), req);
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(matches!(decode::<CreateTopicRequest>(&longer), Err(DecodeError::Invalid { what: "message body", .. })));
        assert!(decode::<MetadataResponse>(&[0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn a_header_length_beyond_the_payload_is_truncated_not_a_panic() {
        let mut p = BytesMut::new();
        p.put_u32_le(1000);
        p.put_slice(b"xx");
        assert!(matches!(split_with_batches::<ProduceRequest>(&p.freeze()), Err(DecodeError::Truncated { .. })));
        assert!(matches!(split_with_batches::<ProduceRequest>(&Bytes::from_static(&[1, 2])), Err(DecodeError::Truncated { .. })));
    }
}
