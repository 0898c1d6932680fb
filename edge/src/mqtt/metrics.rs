//! Metrics of the local MQTT bus (labels are low-cardinality: a fixed `kind` or `reason`).

/// Counter of messages the agent received on its request topics, label `kind` (`update`,
/// `get`, `other`).
pub const IN_TOTAL: &str = "edgesync_mqtt_messages_in_total";
/// Counter of messages the agent queued for publishing, label `kind` (`telemetry`, `result`,
/// `delta`, `document`, `state`, `uplink`, `applied`). With the embedded broker, telemetry
/// that no app is subscribed to is not built, hence not counted.
pub const OUT_TOTAL: &str = "edgesync_mqtt_messages_out_total";
/// Counter of messages dropped, label `reason` (`in_queue_full`: the bus task was behind;
/// `rate_limited`: above `max_requests_per_s`; `out_queue_full`: the external broker client's
/// send queue was full; `lagged`: twin events missed because the bus task was behind;
/// `slow_subscriber`: the embedded broker dropped an app's oldest messages of the agent because
/// the app read too slowly (counted once per app); `bad_topic` / `too_large`: a topic no
/// message can be published to, a message larger than MQTT allows).
pub const DROPPED_TOTAL: &str = "edgesync_mqtt_dropped_total";
/// Counter of bad requests answered with an error result, label `code` (400, 404, 500).
pub const ERRORS_TOTAL: &str = "edgesync_mqtt_request_errors_total";
/// Counter of connection failures of the agent's client.
pub const CLIENT_ERRORS_TOTAL: &str = "edgesync_mqtt_client_errors_total";
/// Counter of connections the embedded broker's guard closed or refused, label `reason`.
pub const GUARD_REFUSED_TOTAL: &str = "edgesync_mqtt_guard_closed_total";
/// Gauge of client connections through the embedded broker's guard.
pub const GUARD_CONNECTIONS: &str = "edgesync_mqtt_guard_connections";

/// Describes the bus metrics to the installed recorder.
pub fn describe() {
    metrics::describe_counter!(IN_TOTAL, "MQTT requests received by the agent, by kind");
    metrics::describe_counter!(OUT_TOTAL, "MQTT messages queued for publishing, by kind");
    metrics::describe_counter!(DROPPED_TOTAL, "MQTT messages dropped, by reason");
    metrics::describe_counter!(
        ERRORS_TOTAL,
        "MQTT requests answered with an error, by code"
    );
    metrics::describe_counter!(
        CLIENT_ERRORS_TOTAL,
        "Connection failures of the agent's MQTT client"
    );
    metrics::describe_counter!(
        GUARD_REFUSED_TOTAL,
        "Connections the embedded broker's guard closed on a problem, by reason"
    );
    metrics::describe_gauge!(
        GUARD_CONNECTIONS,
        "Client connections through the embedded broker's guard"
    );
}

pub(crate) fn received(kind: &'static str) {
    metrics::counter!(IN_TOTAL, "kind" => kind).increment(1);
}

pub(crate) fn sent(kind: &'static str) {
    metrics::counter!(OUT_TOTAL, "kind" => kind).increment(1);
}

pub(crate) fn dropped(reason: &'static str, n: u64) {
    metrics::counter!(DROPPED_TOTAL, "reason" => reason).increment(n);
}

pub(crate) fn request_error(code: u16) {
    let code = match code {
        400 => "400",
        404 => "404",
        _ => "500",
    };
    metrics::counter!(ERRORS_TOTAL, "code" => code).increment(1);
}

pub(crate) fn client_error() {
    metrics::counter!(CLIENT_ERRORS_TOTAL).increment(1);
}

pub(crate) fn refused(reason: &'static str) {
    metrics::counter!(GUARD_REFUSED_TOTAL, "reason" => reason).increment(1);
}

pub(crate) fn connection(delta: i64) {
    metrics::gauge!(GUARD_CONNECTIONS).increment(delta as f64);
}
