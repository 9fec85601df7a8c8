//! The admin HTTP listener: `/health/live`, `/health/ready` and `/metrics` (Prometheus
//! text; every metric is listed in `crate::metrics`). With the `fault-injection`
//! feature only, `POST /test/faults` switches test faults on.
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
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The data directory's free space.
    pub disk_space: Arc<super::disk_space::DiskSpace>,
    /// The switchable faults (`None` unless built with `fault-injection`).
    pub faults: Option<Arc<super::faults::NodeFaults>>,
}

/// How often the metrics recorder drains its histogram buffers.
const METRICS_UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves the admin endpoints on `listener` until the returned task is aborted.
pub fn serve(listener: tokio::net::TcpListener, state: Arc<AdminState>) -> JoinHandle<()> {
    #[allow(unused_mut)]
    let mut app = Router::new()
        .route("/health/live", get(|| async { "live\n" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(|State(state): State<Arc<AdminState>>| async move { state.metrics.render() }));
    #[cfg(feature = "fault-injection")]
    if state.faults.is_some() {
        app = app.route("/test/faults", axum::routing::post(set_faults));
    }
    let app = app.with_state(state.clone());
    tokio::spawn(async move {
        let upkeep = tokio::spawn(async move {
            let mut tick = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
            loop {
                tick.tick().await;
                state.metrics.run_upkeep();
            }
        });
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin listener stopped");
        }
        upkeep.abort();
    })
}

/// The body of `POST /test/faults`: each field given is set.
#[cfg(feature = "fault-injection")]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSettings {
    /// Drop the answers of the next N successful produces (the connection is closed).
    drop_produce_answers: Option<u32>,
    /// Sleep this long before every segment fsync in this process (0: off).
    fsync_delay_ms: Option<u64>,
    /// Sleep this long before sending each chunk of a snapshot transfer (0: off).
    snapshot_chunk_delay_ms: Option<u64>,
}

#[cfg(feature = "fault-injection")]
async fn set_faults(State(state): State<Arc<AdminState>>, Json(settings): Json<FaultSettings>) -> (StatusCode, String) {
    let Some(faults) = &state.faults else { return (StatusCode::NOT_FOUND, "fault injection is not built in\n".into()) };
    if let Some(n) = settings.drop_produce_answers {
        faults.drop_produce_answers(n);
    }
    if let Some(ms) = settings.fsync_delay_ms {
        keel_storage::observe::inject_fsync_delay(std::time::Duration::from_millis(ms));
    }
    if let Some(ms) = settings.snapshot_chunk_delay_ms {
        crate::peer::snapshot::CHUNK_DELAY_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::warn!(?settings, "test faults set");
    (StatusCode::OK, "faults set\n".into())
}

/// Leaderless partitions named in a readiness answer; the rest are counted.
const LEADERLESS_LISTED_MAX: usize = 20;

/// The reasons this node is not ready (empty: ready).
pub fn not_ready_reasons(state: &AdminState) -> Vec<String> {
    let mut reasons = Vec::new();
    if state.metadata_group.working_leader().is_none() {
        reasons.push("the metadata group has no leader (is a majority of the cluster up?)".to_string());
    }
    let hosted = state.hosted.read().expect("hosted lock poisoned").clone();
    let mut leaderless: Vec<String> = hosted.values().filter(|p| p.group.settled_leader().is_none()).map(|p| format!("{}/{}", p.topic, p.partition)).collect();
    leaderless.sort();
    if !leaderless.is_empty() {
        // Summarised: a node holds thousands of partitions.
        let shown = leaderless.len().min(LEADERLESS_LISTED_MAX);
        let more = leaderless.len() - shown;
        let tail = if more > 0 { format!(" and {more} more") } else { String::new() };
        reasons.push(format!("{} partitions without a leader: {}{tail}", leaderless.len(), leaderless[..shown].join(", ")));
    }
    if let Some(why) = state.disk_space.refusal() {
        reasons.push(why);
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
