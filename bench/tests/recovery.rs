//! SPEC §10 proved by counting: `loadgen recovery` with 1200 sockets over
//! the three dialects and 3 nodes, 3 publishers, once with a node SIGKILLed
//! and once with a rolling restart (SIGTERM, drain, 1012, restart). Every
//! event a publisher got 204 for must reach every socket in its rooms
//! exactly once and in order per room, every resumed room must say
//! `recovered: true`, and the fault must really have happened.
//!
//! The loadgen starts `switchboard` found beside it in the same target dir;
//! `cargo test --workspace --all-targets` builds both first. Rates are
//! chosen for a debug build on 2 cores: each run takes about 15 s.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

/// One scenario at a time: each runs 3 nodes and a thousand sockets.
static SERIAL: Mutex<()> = Mutex::new(());

const SOCKETS: u64 = 1200;

fn run(fault: &str) -> Value {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let loadgen = env!("CARGO_BIN_EXE_loadgen");
    let server = Path::new(loadgen).with_file_name("switchboard");
    assert!(
        server.exists(),
        "{} is missing: build the workspace (cargo test --workspace --all-targets builds it)",
        server.display()
    );
    let out = Command::new(loadgen)
        .args(["recovery", "--nodes", "3", "--publishers", "3"])
        .args(["--sockets", &SOCKETS.to_string(), "--group-size", "20"])
        .args(["--rate", "150", "--secs", "8", "--fault", fault])
        .args(["--max-secs", "100"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("loadgen runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
    assert!(
        out.status.success(),
        "loadgen recovery --fault {fault} failed ({}):\n{stdout}\nstderr (last lines, newest first):\n{}",
        out.status,
        tail.join("\n")
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in:\n{stdout}"));
    let v: Value = serde_json::from_str(line).expect("the JSON line parses");
    println!("{stdout}");
    v
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// What both faults must show.
fn check_counts(v: &Value) {
    assert_eq!(n(v, "sockets"), SOCKETS);
    for d in ["/", "/ws", "/ws/driver/orders/"] {
        assert_eq!(v["dialects"][d].as_u64(), Some(SOCKETS / 3), "{d}: {v}");
    }
    assert!(n(v, "events_acknowledged") > 500, "too few events: {v}");
    assert!(
        n(v, "deliveries_expected") > 10 * n(v, "events_acknowledged"),
        "{v}"
    );
    assert_eq!(n(v, "delivered"), n(v, "deliveries_expected"), "{v}");
    assert_eq!(n(v, "lost"), 0, "{v}");
    assert_eq!(n(v, "duplicated"), 0, "{v}");
    assert_eq!(n(v, "out_of_order"), 0, "{v}");
    assert_eq!(n(v, "misrouted"), 0, "{v}");
    assert_eq!(n(v, "bad_frames"), 0, "{v}");
    assert_eq!(n(v, "not_recovered"), 0, "{v}");
    assert_eq!(v["quiet"], true, "{v}");
    // The fault happened: every socket of the faulted node(s) reconnected,
    // resumed its rooms, and some of them had missed events replayed.
    let faulted = n(v, "sockets_on_faulted_nodes");
    assert!(faulted >= SOCKETS / 3 - 10, "too few sockets hit: {v}");
    assert!(n(v, "reconnects") >= faulted, "{v}");
    assert!(n(v, "recovered") >= 2 * faulted, "{v}");
    assert!(n(v, "replayed") > 0, "nothing was replayed: {v}");
}

#[test]
fn a_killed_node_loses_nothing() {
    let v = run("kill");
    check_counts(&v);
    assert_eq!(n(&v, "nodes_faulted"), 1, "{v}");
    // SIGKILL: no close frame, the connections just end.
    assert!(
        v["closes"]["1006"].as_u64() >= Some(n(&v, "sockets_on_faulted_nodes")),
        "{v}"
    );
}

#[test]
fn a_rolling_restart_loses_nothing() {
    let v = run("rolling");
    check_counts(&v);
    assert_eq!(n(&v, "nodes_faulted"), 3, "{v}");
    assert_eq!(n(&v, "stuck"), 0, "a node did not exit after SIGTERM: {v}");
    // Every socket was drained at least once (its node restarted), with 1012.
    assert!(n(&v, "sockets_on_faulted_nodes") >= SOCKETS, "{v}");
    assert!(v["closes"]["1012"].as_u64() >= Some(SOCKETS), "{v}");
}
