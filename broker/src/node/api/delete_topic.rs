//! `DeleteTopic`: through the metadata log; every node then stops and deletes the
//! topic's partitions.

use std::sync::Arc;

use bytes::Bytes;
use keel_protocol::message::{self, DeleteTopicRequest};

use super::{ApiError, ClientService, Request};
use crate::metadata::MetadataCommand;

pub async fn handle(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let req: DeleteTopicRequest = message::decode(&req.payload)?;
    if !service.metadata.borrow().topics.contains_key(&req.name) {
        return Err(ApiError::UnknownTopic(req.name));
    }
    service.propose(MetadataCommand::DeleteTopic { name: req.name }).await?;
    Ok(Bytes::new())
}
