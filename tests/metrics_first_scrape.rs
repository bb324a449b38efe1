//! Every metric is exported from a fresh node's first scrape (SPEC §11), as
//! zero-valued series, so dashboards and `absent()`-style alerts do not see
//! "no data" after a deploy. Its own test binary: the metrics recorder is
//! process-wide, and no other node may have made traffic first.

mod common;

use common::*;
use switchboard::metrics::ALL;

#[tokio::test]
async fn a_fresh_node_exports_every_metric_at_its_first_scrape() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "fresh")).await;
    let (status, body) = http_raw(node.addr, "GET", "/metrics", &[], None).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    let missing: Vec<&&str> = ALL
        .iter()
        .filter(|m| !text.contains(&format!("# TYPE {m} ")))
        .collect();
    assert!(
        missing.is_empty(),
        "absent from the first scrape: {missing:?}\n{text}"
    );
    // Zero-valued series for known label values, e.g. every dialect.
    for d in ["rooms", "events", "driver"] {
        assert!(
            text.contains(&format!("switchboard_sockets_open{{dialect=\"{d}\"}} 0")),
            "{d}\n{text}"
        );
    }
    assert!(
        text.contains("switchboard_offers_total{outcome=\"no_driver\"} 0"),
        "{text}"
    );
}
