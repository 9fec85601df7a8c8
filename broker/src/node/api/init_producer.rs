//! `InitProducer`: an identity (producer id and epoch) for an idempotent producer.
//!
//! An anonymous producer gets a fresh id at epoch 0 from this node's current block of
//! ids (blocks of `PRODUCER_ID_BLOCK` come from the metadata log, so ids are never
//! handed out twice, even across restarts; a restart skips the rest of its block). A
//! named producer is registered through the metadata log: a new name gets a fresh id,
//! a known one its epoch + 1, which fences the instance that held it.

use std::sync::Arc;

use bytes::Bytes;
use keel_protocol::message::{self, InitProducerRequest, InitProducerResponse, ProducerIdentity};

use super::{ApiError, ClientService, Request};
use crate::metadata::state::Rejection;
use crate::metadata::MetadataCommand;
use crate::node::limits::PRODUCER_ID_BLOCK;

pub async fn handle(service: Arc<ClientService>, req: Request) -> Result<Bytes, ApiError> {
    let req: InitProducerRequest = message::decode(&req.payload)?;
    let producer = match req.name {
        Some(name) => named(&service, name, req.current).await?,
        None => ProducerIdentity { producer_id: anonymous_id(&service).await?, epoch: 0 },
    };
    Ok(message::encode(&InitProducerResponse { producer }))
}

async fn named(service: &ClientService, name: String, current: Option<ProducerIdentity>) -> Result<ProducerIdentity, ApiError> {
    if name.is_empty() || name.len() > 255 {
        return Err(ApiError::InvalidArgument("a producer name is 1..=255 bytes".into()));
    }
    let (offset, state) = service.propose(MetadataCommand::InitNamedProducer { name: name.clone(), current }).await?;
    match state.rejection_at(offset) {
        Some(Rejection::ProducerFenced(_)) => {
            return Err(ApiError::Fenced(format!("producer {name:?} was registered again by a newer instance; this one is fenced, stop it")));
        }
        Some(other) => return Err(ApiError::InvalidArgument(format!("registering producer {name:?} was refused: {other}"))),
        None => {}
    }
    match state.named_producers.get(&name) {
        Some(p) if p.registered_at == offset => Ok(p.identity),
        // Registered again by another instance right after this one: this one lost.
        Some(_) => Err(ApiError::Fenced(format!("producer {name:?} was registered again by another instance just now; this one is fenced"))),
        None => Err(ApiError::Storage(format!("producer {name:?} is missing after its registration applied"))),
    }
}

async fn anonymous_id(service: &ClientService) -> Result<i64, ApiError> {
    let mut ids = service.producer_ids.lock().await;
    if ids.0 >= ids.1 {
        let (offset, state) = service.propose(MetadataCommand::AllocateProducerIds { node: service.node_id, count: PRODUCER_ID_BLOCK }).await?;
        if let Some(rejection) = state.rejection_at(offset) {
            return Err(ApiError::Storage(format!("allocating producer ids failed: {rejection}")));
        }
        let block = state.producer_blocks.get(&service.node_id).filter(|b| b.allocated_at == offset).copied();
        let block = block.ok_or_else(|| ApiError::Storage("this node's producer id block is missing after its allocation applied".into()))?;
        *ids = (block.first, block.first + block.count as i64);
    }
    let id = ids.0;
    ids.0 += 1;
    Ok(id)
}
