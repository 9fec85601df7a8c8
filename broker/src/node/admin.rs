//! The admin HTTP listener: `/health/live` and `/health/ready` (metrics and the web
//! console will join them).
//!
//! Ready means: the metadata group has a working leader, every partition hosted here
//! has one, and the data directory accepts a write. A 503 answer lists what is not
//! ready. (A working leader has heard from a quorum within the lease.)

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use tokio::task::JoinHandle;

use super::group::GroupHandle;
use super::reconcile::HostedPartitions;

pub struct AdminState {
    pub metadata_group: GroupHandle,
    pub hosted: HostedPartitions,
    pub data_dir: PathBuf,
}

/// Serves the admin endpoints on `listener` until the returned task is aborted.
pub fn serve(listener: tokio::net::TcpListener, state: Arc<AdminState>) -> JoinHandle<()> {
    let app = Router::new().route("/health/live", get(|| async { "live\n" })).route("/health/ready", get(ready)).with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin listener stopped");
        }
    })
}

/// The reasons this node is not ready (empty: ready).
pub fn not_ready_reasons(state: &AdminState) -> Vec<String> {
    let mut reasons = Vec::new();
    if state.metadata_group.working_leader().is_none() {
        reasons.push("the metadata group has no leader (is a majority of the cluster up?)".to_string());
    }
    let hosted = state.hosted.read().expect("hosted lock poisoned").clone();
    let mut leaderless: Vec<String> = hosted.values().filter(|p| p.group.working_leader().is_none()).map(|p| format!("{}/{}", p.topic, p.partition)).collect();
    leaderless.sort();
    if !leaderless.is_empty() {
        reasons.push(format!("partitions without a leader: {}", leaderless.join(", ")));
    }
    let probe = state.data_dir.join(".ready-probe");
    if let Err(e) = std::fs::write(&probe, b"ok").and_then(|_| std::fs::remove_file(&probe)) {
        reasons.push(format!("the data directory {} is not writable: {e}", state.data_dir.display()));
    }
    reasons
}

async fn ready(State(state): State<Arc<AdminState>>) -> (StatusCode, Json<serde_json::Value>) {
    let reasons = not_ready_reasons(&state);
    if reasons.is_empty() {
        (StatusCode::OK, Json(serde_json::json!({"ready": true})))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"ready": false, "reasons": reasons})))
    }
}
