//! `AlterTopic`: change some of a topic's settings through the metadata log. The fold
//! applies the patch to the config it holds and refuses an invalid result, so two
//! racing alters both apply, in log order. Settings partitions apply (dedupe window,
//! id budget, producer expiry) reach each partition as a `Configure` entry with its next
//! write.

use std::sync::Arc;

use bytes::Bytes;
use keel_protocol::message::{self, AlterTopicRequest, AlterTopicResponse};

use super::{ApiError, ClientService, Request};
use crate::metadata::MetadataCommand;

pub async fn handle(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let req: AlterTopicRequest = message::decode(&req.payload)?;
    if req.config.is_empty() {
        return Err(ApiError::InvalidArgument("the alter sets no setting; name at least one".into()));
    }
    let current = service.metadata.borrow().topics.get(&req.name).map(|t| t.config.clone()).ok_or_else(|| ApiError::UnknownTopic(req.name.clone()))?;
    // Checked here for a clear answer; the fold checks again against the config it holds.
    current.patched(&req.config).validate().map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
    let (offset, state) = service.propose(MetadataCommand::AlterTopicConfig { name: req.name.clone(), patch: req.config }).await?;
    if let Some(rejection) = state.rejection_at(offset) {
        return Err(ApiError::InvalidArgument(format!("the change was refused ({rejection}): a concurrent change made it invalid; read the config and retry")));
    }
    let t = state.topics.get(&req.name).ok_or_else(|| ApiError::UnknownTopic(req.name.clone()))?;
    Ok(message::encode(&AlterTopicResponse { config: t.config.clone() }))
}
