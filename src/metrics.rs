//! Every metric name, described once. Labels stay bounded: dialect, kind,
//! route, status, op — never a room, user or order id.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const SOCKETS_OPEN: &str = "switchboard_sockets_open";
pub const SOCKETS_OPENED: &str = "switchboard_sockets_opened_total";
pub const WS_MESSAGES_IN: &str = "switchboard_ws_messages_in_total";
pub const WS_MESSAGES_OUT: &str = "switchboard_ws_messages_out_total";
pub const WS_ERRORS: &str = "switchboard_ws_errors_total";
pub const SLOW_CONSUMERS: &str = "switchboard_slow_consumers_total";
pub const BROKER_PUBLISHED: &str = "switchboard_broker_published_total";
pub const BROKER_RECEIVED: &str = "switchboard_broker_received_total";
pub const BROKER_RECONNECTS: &str = "switchboard_broker_reconnects_total";
pub const DELIVERY_LATENCY: &str = "switchboard_delivery_latency_seconds";
pub const REDIS_DURATION: &str = "switchboard_redis_command_duration_seconds";
pub const REDIS_ERRORS: &str = "switchboard_redis_errors_total";
pub const HTTP_DURATION: &str = "switchboard_http_request_duration_seconds";
pub const HTTP_REQUESTS: &str = "switchboard_http_requests_total";
pub const READY: &str = "switchboard_ready";
pub const DISPATCH_DURATION: &str = "switchboard_dispatch_duration_seconds";
pub const OFFERS: &str = "switchboard_offers_total";
pub const DRIVER_LOCATIONS: &str = "switchboard_driver_locations_total";
pub const SYNC_JOBS: &str = "switchboard_sync_jobs";
pub const SYNC_ATTEMPTS: &str = "switchboard_sync_attempts_total";
pub const SYNC_DELIVERED: &str = "switchboard_sync_delivered_total";
pub const SYNC_FAILED: &str = "switchboard_sync_failed_total";
pub const SYNC_LATENCY: &str = "switchboard_sync_delivery_latency_seconds";
pub const OUTBOX_PENDING: &str = "switchboard_outbox_pending";
pub const OUTBOX_RELAYED: &str = "switchboard_outbox_relayed_total";
pub const OUTBOX_RELAY_ERRORS: &str = "switchboard_outbox_relay_errors_total";
pub const NODE_INFO: &str = "switchboard_node_info";
pub const RATE_LIMITED: &str = "switchboard_rate_limited_messages_total";
pub const UPGRADES_REJECTED: &str = "switchboard_upgrades_rejected_total";
pub const LOCATIONS_COALESCED: &str = "switchboard_locations_coalesced_total";
pub const RECOVERIES: &str = "switchboard_recoveries_total";
pub const REPLAYED: &str = "switchboard_replayed_events_total";
pub const HISTORY_DUPLICATES: &str = "switchboard_history_duplicates_total";

/// Every metric name the server exports: what `grafana/dashboard.json`,
/// `grafana/alerts.yml` and `tests/ops.rs` check their queries against. A
/// histogram is listed once by its base name (Prometheus adds `_bucket`,
/// `_sum` and `_count`). A metric appears on `/metrics` once it was first
/// recorded, so a fresh node shows only part of this list.
pub const ALL: &[&str] = &[
    SOCKETS_OPEN,
    SOCKETS_OPENED,
    WS_MESSAGES_IN,
    WS_MESSAGES_OUT,
    WS_ERRORS,
    SLOW_CONSUMERS,
    BROKER_PUBLISHED,
    BROKER_RECEIVED,
    BROKER_RECONNECTS,
    DELIVERY_LATENCY,
    REDIS_DURATION,
    REDIS_ERRORS,
    HTTP_DURATION,
    HTTP_REQUESTS,
    READY,
    DISPATCH_DURATION,
    OFFERS,
    DRIVER_LOCATIONS,
    SYNC_JOBS,
    SYNC_ATTEMPTS,
    SYNC_DELIVERED,
    SYNC_FAILED,
    SYNC_LATENCY,
    OUTBOX_PENDING,
    OUTBOX_RELAYED,
    OUTBOX_RELAY_ERRORS,
    NODE_INFO,
    RATE_LIMITED,
    UPGRADES_REJECTED,
    LOCATIONS_COALESCED,
    RECOVERIES,
    REPLAYED,
    HISTORY_DUPLICATES,
];

/// Sub-millisecond to seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once (several in-process nodes in a
/// test share it) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("buckets are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            zero_series();
            handle
        })
        .clone()
}

/// Series that exist from the first scrape with value 0, so a dashboard or
/// an alert over them never sees "no data" on a fresh node.
fn zero_series() {
    for outcome in [
        "recovered",
        "epoch_changed",
        "too_old",
        "unavailable",
        "bad_since",
    ] {
        metrics::counter!(RECOVERIES, "outcome" => outcome).increment(0);
    }
    metrics::counter!(REPLAYED).increment(0);
    for dialect in ["rooms", "events", "driver"] {
        metrics::counter!(RATE_LIMITED, "dialect" => dialect).increment(0);
    }
    for reason in ["max_connections", "draining"] {
        metrics::counter!(UPGRADES_REJECTED, "reason" => reason).increment(0);
    }
    metrics::counter!(LOCATIONS_COALESCED).increment(0);
    metrics::counter!(HISTORY_DUPLICATES).increment(0);
}

fn describe() {
    describe_gauge!(SOCKETS_OPEN, "WebSocket connections open, by dialect");
    describe_counter!(SOCKETS_OPENED, "WebSocket connections accepted, by dialect");
    describe_counter!(
        WS_MESSAGES_IN,
        "Messages received from sockets, by dialect and type"
    );
    describe_counter!(
        WS_MESSAGES_OUT,
        "Event frames queued to sockets, by dialect and kind"
    );
    describe_counter!(
        WS_ERRORS,
        "Error messages sent to sockets, by dialect and code"
    );
    describe_counter!(
        SLOW_CONSUMERS,
        "Sockets closed because their send queue overflowed"
    );
    describe_counter!(BROKER_PUBLISHED, "Room messages published to the broker");
    describe_counter!(BROKER_RECEIVED, "Room messages received from the broker");
    describe_counter!(BROKER_RECONNECTS, "Times the broker subscriber reconnected");
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "Event produced (any node) to frames queued on this node"
    );
    describe_histogram!(
        REDIS_DURATION,
        Unit::Seconds,
        "Redis command latency, by op"
    );
    describe_counter!(REDIS_ERRORS, "Redis command errors, by op");
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request latency, by route and status"
    );
    describe_counter!(HTTP_REQUESTS, "HTTP requests, by route and status");
    describe_gauge!(
        READY,
        "1 when the node is ready (Redis and DB reachable, not draining)"
    );
    describe_histogram!(
        DISPATCH_DURATION,
        Unit::Seconds,
        "Time to pick a driver and make an offer"
    );
    describe_counter!(
        OFFERS,
        "Offers by outcome: made, accepted, declined, expired"
    );
    describe_counter!(DRIVER_LOCATIONS, "Driver positions ingested");
    describe_gauge!(
        SYNC_JOBS,
        "Sync outbox jobs by status (pending, delivering, failed)"
    );
    describe_counter!(
        SYNC_ATTEMPTS,
        "Sync delivery attempts by result (ok, error)"
    );
    describe_counter!(SYNC_DELIVERED, "Sync jobs delivered");
    describe_counter!(SYNC_FAILED, "Sync jobs that ran out of attempts");
    describe_histogram!(
        SYNC_LATENCY,
        Unit::Seconds,
        "Order change committed to sync delivered"
    );
    describe_gauge!(
        OUTBOX_PENDING,
        "Event outbox rows waiting to be published (whole cluster, read every second)"
    );
    describe_counter!(
        OUTBOX_RELAYED,
        "Outbox events this node's relay published to the broker"
    );
    describe_counter!(
        OUTBOX_RELAY_ERRORS,
        "Relay drains that failed, by op (publish, store, lease); retried in order"
    );
    describe_gauge!(
        NODE_INFO,
        "Always 1; labels name this node (NODE_ID) and its version"
    );
    describe_counter!(
        RECOVERIES,
        "Room resumes by outcome: recovered, epoch_changed, too_old, bad_since"
    );
    describe_counter!(REPLAYED, "Historical events replayed to resuming sockets");
    describe_counter!(
        RATE_LIMITED,
        "Socket messages dropped over MAX_MESSAGES_PER_SEC, by dialect"
    );
    describe_counter!(
        UPGRADES_REJECTED,
        "WebSocket upgrades answered 503, by reason (max_connections, draining)"
    );
    describe_counter!(
        LOCATIONS_COALESCED,
        "Driver positions replaced by a later one inside LOCATION_MIN_INTERVAL_MS"
    );
    describe_counter!(
        HISTORY_DUPLICATES,
        "Publishes of an event id already in a room's history (not appended again)"
    );
}
