//! Bodies of the client APIs (`api::client`).
//!
//! Control bodies are postcard-encoded structs. Produce requests and fetch responses
//! carry record batches, which must not be re-encoded: their payload is
//! `header_len:u32le | postcard(header) | batches…`, so the batches are `Bytes` slices of
//! the frame (`split_with_batches`). A fetch response holds zero or more whole batches
//! back to back; each is self-delimiting through its length field.
//!
//! **Versions.** A body is never changed in place. A field is added in a new protocol
//! version as a trailing *extension*: the body of version N+1 is the body of version N
//! followed by a postcard-encoded extension struct, and it is sent only on connections
//! that negotiated N+1 ([`encode_with_ext`], [`decode_with_ext`]). The types below are
//! the newest form; `encode(version)` / `decode(payload, version)` speak each version
//! (`FORMAT.md`, "Versions").

mod consumer;
mod job;

pub use consumer::*;
pub use job::*;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::batch::{batch_size, BatchView};
use crate::error::DecodeError;
use crate::limits::FRAME_BODY_SIZE_MAX;
use crate::topic_config::{self, TopicConfig, TopicConfigPatch};

/// The protocol version that added topic configs, idempotent producers and message-id
/// dedupe: the extensions below, `InitProducer`, `AlterTopic`, `DuplicateMessageIds`.
pub const VERSION_2: u16 = 2;

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

/// A body with a trailing extension: `postcard(base) postcard(ext)`, the extension
/// only when given (the connection's version has it).
pub fn encode_with_ext<B: Serialize, E: Serialize>(base: &B, ext: Option<&E>) -> Bytes {
    let mut out = postcard::to_allocvec(base).expect("postcard encodes every message type to a Vec");
    if let Some(ext) = ext {
        out.extend_from_slice(&postcard::to_allocvec(ext).expect("postcard encodes every message type to a Vec"));
    }
    Bytes::from(out)
}

/// Decodes `postcard(base)` then, when `with_ext`, `postcard(ext)`; the whole payload
/// must be consumed.
pub fn decode_with_ext<B: DeserializeOwned, E: DeserializeOwned>(payload: &[u8], with_ext: bool) -> Result<(B, Option<E>), DecodeError> {
    if !with_ext {
        return Ok((decode(payload)?, None));
    }
    let (base, rest): (B, &[u8]) = postcard::take_from_bytes(payload).map_err(|_| DecodeError::Invalid {
        offset: 0,
        what: "message body",
        reason: "does not decode as the expected message",
    })?;
    let at = payload.len() - rest.len();
    let ext = decode(rest).map_err(|e| e.shifted(at))?;
    Ok((base, Some(ext)))
}

/// `header_len | header`: what goes before the batches of a produce request or a fetch
/// response when the batches are written from their own buffers after it (a frame's
/// tail), so the bytes on the wire equal [`encode_with_batches`]'s without the copy.
pub fn encode_batches_head<T: Serialize>(header: &T) -> Bytes {
    let head = postcard::to_allocvec(header).expect("postcard encodes every message type to a Vec");
    let mut buf = BytesMut::with_capacity(4 + head.len());
    buf.put_u32_le(head.len() as u32);
    buf.put_slice(&head);
    buf.freeze()
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceResponse {
    pub base_offset: u64,
    pub record_count: u32,
    /// Version 2: whether the batch (or its records) had been stored before.
    pub duplicate: Duplicate,
}

/// What of a produced batch had already been stored, so nothing new was written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Duplicate {
    /// The batch is new and was stored at `base_offset`.
    #[default]
    None,
    /// The batch is a retry of one an idempotent producer sent before; `base_offset`
    /// is where that one was stored.
    Batch,
    /// Every record carried a message id already stored within the dedupe window:
    /// `(index in the batch, offset it was stored at)` for each record.
    Records(Vec<(u32, u64)>),
}

#[derive(Serialize, Deserialize)]
struct ProduceResponseV1 {
    base_offset: u64,
    record_count: u32,
}

#[derive(Serialize, Deserialize)]
struct ProduceResponseExt {
    duplicate: Duplicate,
}

impl ProduceResponse {
    pub fn encode(&self, version: u16) -> Bytes {
        let base = ProduceResponseV1 { base_offset: self.base_offset, record_count: self.record_count };
        let ext = (version >= VERSION_2).then(|| ProduceResponseExt { duplicate: self.duplicate.clone() });
        encode_with_ext(&base, ext.as_ref())
    }

    pub fn decode(payload: &[u8], version: u16) -> Result<ProduceResponse, DecodeError> {
        let (base, ext): (ProduceResponseV1, Option<ProduceResponseExt>) = decode_with_ext(payload, version >= VERSION_2)?;
        Ok(ProduceResponse { base_offset: base.base_offset, record_count: base.record_count, duplicate: ext.map(|e| e.duplicate).unwrap_or_default() })
    }
}

/// Body of a `DuplicateMessageIds` refusal: the records whose ids were already stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateMessageIds {
    /// `(index in the batch, offset the id was stored at)`.
    pub records: Vec<(u32, u64)>,
}

/// An idempotent producer's identity: id and epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerIdentity {
    pub producer_id: i64,
    pub epoch: i16,
}

/// `InitProducer` (version 2): get a producer id for idempotent producing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitProducerRequest {
    /// A stable name: re-initialising it bumps the epoch and fences the previous
    /// instance (`ProducerFenced`). `None`: a fresh id, no fencing.
    pub name: Option<String>,
    /// For a named producer re-initialising itself (after a failure broke its
    /// sequence): the identity it holds. The epoch is bumped only if that is still the
    /// name's current identity; otherwise a newer instance exists and the answer is
    /// `ProducerFenced`. `None` for a new instance, which always takes over the name.
    pub current: Option<ProducerIdentity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitProducerResponse {
    pub producer: ProducerIdentity,
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

/// Details of an `OffsetOutOfRange` answer: the range the partition holds, so a
/// consumer behind the log start (retention deleted what it asked for) can move to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutOfRange {
    pub log_start_offset: u64,
    pub high_watermark: u64,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    pub partitions: Vec<PartitionInfo>,
    /// Version 2: the whole config (version 1 carries retention and the batch limit only).
    pub config: TopicConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataResponse {
    pub brokers: Vec<BrokerInfo>,
    pub topics: Vec<TopicInfo>,
}

#[derive(Serialize, Deserialize)]
struct TopicInfoV1 {
    name: String,
    partitions: Vec<PartitionInfo>,
    retention_ms: Option<u64>,
    max_message_bytes: u32,
}

#[derive(Serialize, Deserialize)]
struct MetadataResponseV1 {
    brokers: Vec<BrokerInfo>,
    topics: Vec<TopicInfoV1>,
}

/// Version 2: each topic's config, in the order of `topics`.
#[derive(Serialize, Deserialize)]
struct MetadataResponseExt {
    configs: Vec<String>,
}

impl MetadataResponse {
    pub fn encode(&self, version: u16) -> Bytes {
        let base = MetadataResponseV1 {
            brokers: self.brokers.clone(),
            topics: self
                .topics
                .iter()
                .map(|t| TopicInfoV1 {
                    name: t.name.clone(),
                    partitions: t.partitions.clone(),
                    retention_ms: (t.config.retention_ms > 0).then_some(t.config.retention_ms),
                    max_message_bytes: t.config.max_message_bytes,
                })
                .collect(),
        };
        let ext = (version >= VERSION_2).then(|| MetadataResponseExt { configs: self.topics.iter().map(|t| t.config.to_json()).collect() });
        encode_with_ext(&base, ext.as_ref())
    }

    pub fn decode(payload: &[u8], version: u16) -> Result<MetadataResponse, DecodeError> {
        let (base, ext): (MetadataResponseV1, Option<MetadataResponseExt>) = decode_with_ext(payload, version >= VERSION_2)?;
        let mut configs = ext.map(|e| e.configs.into_iter());
        let mut topics = Vec::with_capacity(base.topics.len());
        for t in base.topics {
            let config = match configs.as_mut() {
                Some(c) => {
                    let json = c.next().ok_or(DecodeError::Invalid { offset: 0, what: "metadata response", reason: "fewer configs than topics" })?;
                    TopicConfig::from_json(&json).map_err(|_| DecodeError::Invalid { offset: 0, what: "topic config", reason: "not a topic config" })?
                }
                None => TopicConfig { retention_ms: t.retention_ms.unwrap_or(0), max_message_bytes: t.max_message_bytes, ..TopicConfig::default() },
            };
            topics.push(TopicInfo { name: t.name, partitions: t.partitions, config });
        }
        Ok(MetadataResponse { brokers: base.brokers, topics })
    }
}

/// `CreateTopic`: the settings not given in `config` take the cluster's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateTopicRequest {
    pub name: String,
    pub partitions: u32,
    pub replicas: u16,
    pub config: TopicConfigPatch,
}

#[derive(Serialize, Deserialize)]
struct CreateTopicRequestV1 {
    name: String,
    partitions: u32,
    replicas: u16,
    retention_ms: Option<u64>,
    max_message_bytes: Option<u32>,
}

#[derive(Serialize, Deserialize)]
struct CreateTopicRequestExt {
    #[serde(with = "topic_config::patch_as_json")]
    config: TopicConfigPatch,
}

impl CreateTopicRequest {
    pub fn encode(&self, version: u16) -> Bytes {
        let base = CreateTopicRequestV1 {
            name: self.name.clone(),
            partitions: self.partitions,
            replicas: self.replicas,
            retention_ms: self.config.retention_ms,
            max_message_bytes: self.config.max_message_bytes,
        };
        let ext = (version >= VERSION_2).then(|| CreateTopicRequestExt { config: self.config.clone() });
        encode_with_ext(&base, ext.as_ref())
    }

    pub fn decode(payload: &[u8], version: u16) -> Result<CreateTopicRequest, DecodeError> {
        let (base, ext): (CreateTopicRequestV1, Option<CreateTopicRequestExt>) = decode_with_ext(payload, version >= VERSION_2)?;
        let config = match ext {
            Some(ext) => ext.config,
            None => TopicConfigPatch { retention_ms: base.retention_ms, max_message_bytes: base.max_message_bytes, ..TopicConfigPatch::default() },
        };
        Ok(CreateTopicRequest { name: base.name, partitions: base.partitions, replicas: base.replicas, config })
    }
}

/// `AlterTopic` (version 2): change some settings of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlterTopicRequest {
    pub name: String,
    #[serde(with = "topic_config::patch_as_json")]
    pub config: TopicConfigPatch,
}

/// The topic's whole configuration after the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlterTopicResponse {
    #[serde(with = "topic_config::as_json")]
    pub config: TopicConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteTopicRequest {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListOffsetsRequest {
    pub topic: String,
    pub partition: u32,
    /// Milliseconds since the Unix epoch; `i64::MAX`: the end (high watermark);
    /// `i64::MIN`: the log start (the first offset retention kept).
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
        let joined: Vec<u8> = std::iter::once(encode_batches_head(&FetchResponse { high_watermark: 4, log_start_offset: 0 }))
            .chain(batches.iter().cloned())
            .flat_map(|b| b.to_vec())
            .collect();
        let payload = encode_with_batches(&FetchResponse { high_watermark: 4, log_start_offset: 0 }, &batches);
        assert_eq!(payload[..], joined[..], "the head and the batches written apart are the same bytes");
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
        let req = DeleteTopicRequest { name: "t".into() };
        let bytes = encode(&req);
        assert_eq!(decode::<DeleteTopicRequest>(&bytes).unwrap(), req);
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(matches!(decode::<DeleteTopicRequest>(&longer), Err(DecodeError::Invalid { what: "message body", .. })));
        assert!(MetadataResponse::decode(&[0xff, 0xff, 0xff], VERSION_2).is_err());
    }

    fn create_request() -> CreateTopicRequest {
        let config = TopicConfigPatch { retention_ms: Some(60_000), dedupe_window_ms: Some(5_000), ..TopicConfigPatch::default() };
        CreateTopicRequest { name: "t".into(), partitions: 3, replicas: 3, config }
    }

    #[test]
    fn a_version_2_body_round_trips_with_its_extension() {
        let req = create_request();
        assert_eq!(CreateTopicRequest::decode(&req.encode(VERSION_2), VERSION_2).unwrap(), req);
        let resp = ProduceResponse { base_offset: 7, record_count: 2, duplicate: Duplicate::Records(vec![(0, 3), (1, 5)]) };
        assert_eq!(ProduceResponse::decode(&resp.encode(VERSION_2), VERSION_2).unwrap(), resp);
    }

    #[test]
    fn a_version_1_peer_gets_the_version_1_body_and_keeps_what_it_can_say() {
        let req = create_request();
        let v1 = req.encode(1);
        let v1_reader: CreateTopicRequestV1 = decode(&v1).unwrap();
        assert_eq!(v1_reader.retention_ms, Some(60_000), "the v1 fields still carry what v1 knows");
        let back = CreateTopicRequest::decode(&v1, 1).unwrap();
        assert_eq!(back.config.retention_ms, Some(60_000));
        assert_eq!(back.config.dedupe_window_ms, None, "v1 cannot say it; the broker's default applies");
        assert!(CreateTopicRequest::decode(&req.encode(VERSION_2), 1).is_err(), "a v1 decoder refuses a v2 body: it is never sent one");
        let resp = ProduceResponse { base_offset: 7, record_count: 2, duplicate: Duplicate::Batch };
        assert_eq!(ProduceResponse::decode(&resp.encode(1), 1).unwrap().duplicate, Duplicate::None);
    }

    #[test]
    fn metadata_carries_each_topic_config_from_version_2() {
        let config = TopicConfig { dedupe_window_ms: 9_000, ..TopicConfig::default() };
        let m = MetadataResponse {
            brokers: vec![BrokerInfo { id: 1, addr: "a:1".into() }],
            topics: vec![TopicInfo { name: "t".into(), partitions: vec![], config: config.clone() }],
        };
        assert_eq!(MetadataResponse::decode(&m.encode(VERSION_2), VERSION_2).unwrap(), m);
        let v1 = MetadataResponse::decode(&m.encode(1), 1).unwrap();
        assert_eq!(v1.topics[0].config.max_message_bytes, config.max_message_bytes);
        assert_eq!(v1.topics[0].config.dedupe_window_ms, TopicConfig::default().dedupe_window_ms);
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
