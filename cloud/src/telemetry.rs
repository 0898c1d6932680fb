//! Hub telemetry: the process-wide Prometheus recorder and the hub's typed telemetry events.
//!
//! Each event function both logs (tracing, fields first) and counts (metrics with
//! low-cardinality labels: never a device or property id as a label, and a node id only on
//! [`GAP_RECORDS_TOTAL`]).
//!
//! [`GAP_RECORDS_TOTAL`] is per node because issue #7 asks for every loss to be visible per
//! node. It has at most one series per node that lost records since the hub started, and a
//! node id comes from a client certificate the hub's trust bundle verified (mTLS, SPIFFE id),
//! so the number of series is bounded by the fleet, not by what a peer sends.

use std::sync::OnceLock;

use edgesync_protocol::NodeId;
use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::store::StoreError;

/// HTTP requests served, by `route` (the matched route pattern, or `unmatched`) and `status`.
pub const HTTP_REQUESTS_TOTAL: &str = "edgesync_hub_http_requests_total";
/// API requests refused for a missing or invalid bearer token, by `reason`.
pub const AUTH_FAILURES_TOTAL: &str = "edgesync_hub_auth_failures_total";
/// Uplink batches committed to the hub store.
pub const COMMITS_TOTAL: &str = "edgesync_hub_commits_total";
/// Uplink batches refused or failed, by `reason`.
pub const COMMIT_FAILURES_TOTAL: &str = "edgesync_hub_commit_failures_total";
/// Uplink records stored (new records only).
pub const RECORDS_STORED_TOTAL: &str = "edgesync_hub_records_stored_total";
/// Uplink records skipped because they were already stored.
pub const DUPLICATE_RECORDS_TOTAL: &str = "edgesync_hub_duplicate_records_total";
/// Uplink records lost at the edge (outbox overflow) and recorded as gaps, by `node`: only
/// records not recorded before, so a resent gap is not counted twice.
pub const GAP_RECORDS_TOTAL: &str = "edgesync_hub_gap_records_total";
/// Stored records removed by the history retention (age or disk quota).
pub const HISTORY_PRUNED_RECORDS_TOTAL: &str = "edgesync_hub_history_pruned_records_total";
/// Bytes of stored records removed by the history retention.
pub const HISTORY_PRUNED_BYTES_TOTAL: &str = "edgesync_hub_history_pruned_bytes_total";
/// Time to commit one uplink batch durably (write and flush), in seconds.
pub const COMMIT_DURATION_SECONDS: &str = "edgesync_hub_commit_duration_seconds";

const COMMIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The process-wide Prometheus handle, installing the recorder on the first call.
///
/// Safe to call any number of times (tests in one process share the recorder). If another
/// recorder is already installed globally, a warning is logged and the returned handle renders
/// an empty (but valid) exposition.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = match builder
                .set_buckets_for_metric(Matcher::Full(COMMIT_DURATION_SECONDS.into()), COMMIT_BUCKETS)
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "commit histogram buckets refused, using summaries");
                    PrometheusBuilder::new()
                }
            };
            let handle = match builder.install_recorder() {
                Ok(handle) => handle,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot install the prometheus recorder, /metrics will be empty");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            };
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        HTTP_REQUESTS_TOTAL,
        Unit::Count,
        "HTTP requests served, by route pattern and status"
    );
    describe_counter!(
        AUTH_FAILURES_TOTAL,
        Unit::Count,
        "API requests refused for a missing or invalid bearer token"
    );
    describe_counter!(COMMITS_TOTAL, Unit::Count, "Uplink batches committed");
    describe_counter!(
        COMMIT_FAILURES_TOTAL,
        Unit::Count,
        "Uplink batches refused or failed, by reason"
    );
    describe_counter!(RECORDS_STORED_TOTAL, Unit::Count, "Uplink records stored");
    describe_counter!(
        DUPLICATE_RECORDS_TOTAL,
        Unit::Count,
        "Uplink records skipped as already stored"
    );
    describe_counter!(
        GAP_RECORDS_TOTAL,
        Unit::Count,
        "Uplink records lost at the edge and recorded as gaps, by node (each record once)"
    );
    describe_counter!(
        HISTORY_PRUNED_RECORDS_TOTAL,
        Unit::Count,
        "Stored records removed by the history retention (age or per-node disk quota)"
    );
    describe_counter!(
        HISTORY_PRUNED_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes of stored records removed by the history retention"
    );
    describe_histogram!(
        COMMIT_DURATION_SECONDS,
        Unit::Seconds,
        "Time to commit one uplink batch durably"
    );
}

/// An HTTP request was answered.
pub(crate) fn http_request(route: &str, status: u16) {
    tracing::debug!(route, status, "http request");
    counter!(HTTP_REQUESTS_TOTAL, "route" => route.to_owned(), "status" => status.to_string())
        .increment(1);
}

/// Why an API request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A bearer token that matches no configured token.
    Invalid,
}

impl AuthFailure {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Invalid => "invalid",
        }
    }
}

/// An API request was refused for its credentials.
pub(crate) fn auth_failure(reason: AuthFailure, route: &str) {
    tracing::info!(reason = reason.as_str(), route, "api request refused");
    counter!(AUTH_FAILURES_TOTAL, "reason" => reason.as_str()).increment(1);
}

/// An uplink batch was committed durably.
pub(crate) fn batch_committed(accepted: usize, duplicates: usize, seconds: f64) {
    counter!(COMMITS_TOTAL).increment(1);
    counter!(RECORDS_STORED_TOTAL).increment(accepted as u64);
    if duplicates > 0 {
        counter!(DUPLICATE_RECORDS_TOTAL).increment(duplicates as u64);
    }
    histogram!(COMMIT_DURATION_SECONDS).record(seconds);
}

/// A gap (records `from..=to` lost at the edge) was stored durably; `new_records` of them were
/// not recorded before (0 for a resent gap).
pub(crate) fn gap_committed(node: &NodeId, from: u64, to: u64, new_records: u64) {
    if new_records == 0 {
        tracing::debug!(node = %node, from, to, "gap already recorded (resent)");
        return;
    }
    tracing::warn!(node = %node, from, to, new_records, "records lost at the edge (outbox overflow): gap recorded");
    counter!(GAP_RECORDS_TOTAL, "node" => node.as_str().to_owned()).increment(new_records);
}

/// An uplink batch was refused or could not be stored.
pub(crate) fn commit_failed(node: &NodeId, error: &StoreError) {
    let reason = match error {
        StoreError::Gap { .. } => "gap",
        StoreError::InvalidSeq { .. } => "invalid_seq",
        StoreError::TwinFull { .. } => "twin_full",
        StoreError::Corrupt { .. } => "corrupt",
        StoreError::InvalidGap { .. } => "invalid_gap",
        StoreError::Task(_) => "task",
        StoreError::Sled(_) => "storage",
    };
    tracing::warn!(node = %node, reason, error = %error, "uplink batch not stored");
    counter!(COMMIT_FAILURES_TOTAL, "reason" => reason).increment(1);
}

/// Records and bytes removed by one retention sweep.
pub fn history_pruned(p: &crate::store::Pruned) {
    if p.records > 0 || p.bytes > 0 {
        counter!(HISTORY_PRUNED_RECORDS_TOTAL).increment(p.records);
        counter!(HISTORY_PRUNED_BYTES_TOTAL).increment(p.bytes);
    }
}
