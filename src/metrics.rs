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
pub const BROKER_FILLED: &str = "switchboard_broker_filled_total";
pub const BROKER_DUPLICATES: &str = "switchboard_broker_duplicates_dropped_total";
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
/// `_sum` and `_count`). Every one is on `/metrics` from the first scrape
/// (zero-valued series, see `zero_series`).
pub const ALL: &[&str] = &[
    SOCKETS_OPEN,
    SOCKETS_OPENED,
    WS_MESSAGES_IN,
    WS_MESSAGES_OUT,
    WS_ERRORS,
    SLOW_CONSUMERS,
    BROKER_PUBLISHED,
    BROKER_RECEIVED,
    BROKER_FILLED,
    BROKER_DUPLICATES,
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

/// Sub-millisecond to seconds; 1.5 and 2 ms resolve the nearest-driver
/// lookup against its 2 ms bar (BENCHMARKS.md).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
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
            upkeep(handle.clone(), UPKEEP_EVERY);
            handle
        })
        .clone()
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// `install_recorder` leaves upkeep to the caller: every histogram sample
/// (request durations, delivery latencies, Redis timings) is kept raw until
/// something drains it, and only a scrape did. A node nobody scraped grew
/// by about 0.1 MiB a minute under the soak's load (`loadgen soak`,
/// BENCHMARKS.md). One thread per process (the recorder is global) drains
/// them every few seconds.
fn upkeep(handle: PrometheusHandle, every: std::time::Duration) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no metrics upkeep thread: histograms drain at scrapes only");
    }
}

/// Series that exist from the first scrape with value 0, for every metric
/// and every known value of its labels, so a dashboard or an alert over them
/// never sees "no data" on a fresh node (SPEC §11). Histograms are
/// registered empty. HTTP series exist for the probes' and the scrape's own
/// routes; others (route × status) appear with their first request, since
/// their statuses are not a closed list.
fn zero_series() {
    const DIALECTS: [&str; 3] = ["rooms", "events", "driver"];
    const KINDS: [&str; 9] = [
        "order_created",
        "order_updated",
        "order_deleted",
        "offer_made",
        "offer_ended",
        "driver_location",
        "bonus_updated",
        "sync",
        "custom",
    ];
    // The socket-level codes (README "Sockets"); rule errors from the
    // domain appear with their first use.
    const WS_ERROR_CODES: [&str; 15] = [
        "bad_json",
        "bad_message",
        "unknown_type",
        "binary_not_supported",
        "frame_too_large",
        "bad_frame",
        "join_refused",
        "forbidden",
        "unauthorized",
        "broker_unavailable",
        "unavailable",
        "bad_since",
        "rate_limited",
        "too_many_rooms",
        "frame_timeout",
    ];
    const MESSAGE_TYPES: [&str; 5] = ["ping", "join-room", "leave-room", "location", "invalid"];
    const REDIS_OPS: [&str; 13] = [
        "publish",
        "subscribe",
        "heartbeat",
        "geo_put",
        "geo_nearest",
        "geo_pos",
        "driver_status",
        "offer_schedule",
        "offer_seed",
        "offer_claim",
        "offer_cancel",
        "offer_done",
        "history_read",
    ];
    for d in DIALECTS {
        metrics::gauge!(SOCKETS_OPEN, "dialect" => d).increment(0.0);
        metrics::counter!(SOCKETS_OPENED, "dialect" => d).increment(0);
        metrics::counter!(SLOW_CONSUMERS, "dialect" => d).increment(0);
        metrics::counter!(RATE_LIMITED, "dialect" => d).increment(0);
        for t in MESSAGE_TYPES {
            metrics::counter!(WS_MESSAGES_IN, "dialect" => d, "type" => t).increment(0);
        }
        for k in KINDS {
            metrics::counter!(WS_MESSAGES_OUT, "dialect" => d, "kind" => k).increment(0);
        }
        for code in WS_ERROR_CODES {
            metrics::counter!(WS_ERRORS, "dialect" => d, "code" => code).increment(0);
        }
    }
    for op in REDIS_OPS {
        metrics::counter!(REDIS_ERRORS, "op" => op).increment(0);
        let _ = metrics::histogram!(REDIS_DURATION, "op" => op);
    }
    for c in [
        BROKER_PUBLISHED,
        BROKER_RECEIVED,
        BROKER_FILLED,
        BROKER_DUPLICATES,
        BROKER_RECONNECTS,
        DRIVER_LOCATIONS,
    ] {
        metrics::counter!(c).increment(0);
    }
    for outcome in ["made", "accepted", "declined", "expired", "no_driver"] {
        metrics::counter!(OFFERS, "outcome" => outcome).increment(0);
    }
    for h in [DELIVERY_LATENCY, DISPATCH_DURATION, SYNC_LATENCY] {
        let _ = metrics::histogram!(h);
    }
    for status in ["pending", "delivering", "failed"] {
        metrics::gauge!(SYNC_JOBS, "status" => status).increment(0.0);
    }
    for result in ["ok", "error"] {
        metrics::counter!(SYNC_ATTEMPTS, "result" => result).increment(0);
    }
    metrics::counter!(SYNC_DELIVERED).increment(0);
    metrics::counter!(SYNC_FAILED).increment(0);
    metrics::gauge!(READY).increment(0.0);
    metrics::gauge!(OUTBOX_PENDING).increment(0.0);
    metrics::counter!(OUTBOX_RELAYED).increment(0);
    for outcome in ["recovered", "epoch_changed", "too_old", "bad_since"] {
        metrics::counter!(RECOVERIES, "outcome" => outcome).increment(0);
    }
    metrics::counter!(REPLAYED).increment(0);
    for reason in ["max_connections", "draining"] {
        metrics::counter!(UPGRADES_REJECTED, "reason" => reason).increment(0);
    }
    metrics::counter!(LOCATIONS_COALESCED).increment(0);
    metrics::counter!(HISTORY_DUPLICATES).increment(0);
    // The probes' and the scrape's own routes.
    for (route, status) in [
        ("/metrics", "200"),
        ("/readyz", "200"),
        ("/readyz", "503"),
        ("/healthz", "200"),
    ] {
        metrics::counter!(HTTP_REQUESTS, "route" => route, "status" => status).increment(0);
        let _ = metrics::histogram!(HTTP_DURATION, "route" => route, "status" => status);
    }
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
    describe_counter!(
        BROKER_FILLED,
        "Historical events read back from a room's history because this node's subscription missed them (reconnect catch-up, gap fill)"
    );
    describe_counter!(
        BROKER_DUPLICATES,
        "Live broker messages dropped because a catch-up had already delivered them"
    );
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
