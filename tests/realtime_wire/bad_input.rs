//! Bad input: an error in the dialect's shape, and the socket goes on.

use fastwebsockets::{Frame, OpCode, Payload};
use serde_json::json;

use crate::common::*;
use crate::{ENDPOINTS, assert_error, member};

const MAX_FRAME: usize = 1024;

#[tokio::test]
async fn bad_input_gets_an_error_and_the_socket_keeps_working() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "bad-input");
    cfg.max_frame_bytes = MAX_FRAME;
    let node = TestNode::start(cfg).await;
    for (dialect, path) in ENDPOINTS {
        let (tok, r) = member(dialect);
        let mut victim = connect_ready(node.addr, path, &tok).await;
        let mut bystander = connect_ready(node.addr, path, &tok).await;

        // Over the limit but well under the hard cap; valid JSON (a ping),
        // so a pong would mean the limit was not applied.
        let big = format!(
            r#"{{"type":"ping","pad":"{}"}}"#,
            "x".repeat(MAX_FRAME + 100)
        );
        let bad: Vec<(&str, Frame<'_>)> = vec![
            ("bad_json", Frame::text(Payload::Borrowed(b"{\"type\":"))),
            ("bad_json", Frame::text(Payload::Borrowed(b"hello"))),
            (
                "unknown_type",
                Frame::text(Payload::Borrowed(br#"{"type":"dance","data":{}}"#)),
            ),
            (
                "binary_not_supported",
                Frame::binary(Payload::Borrowed(br#"{"type":"ping"}"#)),
            ),
            (
                "frame_too_large",
                Frame::text(Payload::Owned(big.into_bytes())),
            ),
        ];
        for (code, frame) in bad {
            victim.send_frame(frame).await;
            let got = victim.recv().await;
            assert_error(dialect, &got, code);
            // Still answering.
            victim.send_json(json!({"type": "ping"})).await;
            assert_eq!(
                victim.recv().await,
                json!({"type": "pong"}),
                "{path} after {code}"
            );
        }
        // Still receiving publishes, and so is the bystander, which saw
        // nothing of the victim's errors.
        node.publish(r, "after-bad-input", json!({"n": 1})).await;
        for c in [&mut victim, &mut bystander] {
            let got = c.recv().await;
            assert_eq!(got["type"], "after-bad-input", "{path}: {got}");
        }
        bystander.send_json(json!({"type": "ping"})).await;
        assert_eq!(bystander.recv().await, json!({"type": "pong"}));
        // The limit is about size, not about large-ish frames as such.
        let fits = format!(
            r#"{{"type":"ping","pad":"{}"}}"#,
            "x".repeat(MAX_FRAME - 40)
        );
        assert!(fits.len() <= MAX_FRAME);
        victim.send_text(&fits).await;
        assert_eq!(victim.recv().await, json!({"type": "pong"}), "{path}");
    }
}

#[tokio::test]
async fn a_frame_over_the_hard_cap_gets_an_error_then_close_1009() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "hard-cap");
    cfg.max_frame_bytes = MAX_FRAME;
    let node = TestNode::start(cfg).await;
    // `hard_cap` in ws::conn: max(4 × MAX_FRAME_BYTES, 256 KiB).
    let hard_cap = (4 * MAX_FRAME).max(256 * 1024);
    for (dialect, path) in ENDPOINTS {
        let (tok, r) = member(dialect);
        let mut victim = connect_ready(node.addr, path, &tok).await;
        let mut bystander = connect_ready(node.addr, path, &tok).await;
        let mut huge = br#"{"type":"ping","pad":""#.to_vec();
        huge.resize(hard_cap + 1024, b'x');
        huge.extend_from_slice(b"\"}");
        // The server stops reading at the header: write from another task.
        let writing = victim.spawn_send(OpCode::Text, huge);
        let got = victim.recv().await;
        assert_error(dialect, &got, "frame_too_large");
        match victim.next_seen(WAIT).await {
            Some(Seen::Close(code)) => assert_eq!(code, 1009, "{path}"),
            other => panic!("{path}: expected close 1009, got {other:?}"),
        }
        let _ = writing.await;
        // Nobody else noticed.
        node.publish(r, "after-hard-cap", json!({})).await;
        assert_eq!(bystander.recv().await["type"], "after-hard-cap");
        bystander.send_json(json!({"type": "ping"})).await;
        assert_eq!(bystander.recv().await, json!({"type": "pong"}));
    }
}

#[tokio::test]
async fn fragmented_messages_are_reassembled_and_bad_frames_closed_1002() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "frames")).await;
    for (dialect, path) in ENDPOINTS {
        let (tok, r) = member(dialect);
        let mut c = connect_ready(node.addr, path, &tok).await;
        // `{"type":"ping"}` in three frames, a control frame in between.
        let parts: [&[u8]; 3] = [b"{\"ty", b"pe\":\"pi", b"ng\"}"];
        let frames = [
            (false, OpCode::Text, parts[0]),
            (true, OpCode::Ping, &b"hb"[..]),
            (false, OpCode::Continuation, parts[1]),
            (true, OpCode::Continuation, parts[2]),
        ];
        for (fin, op, payload) in frames {
            c.send_frame(Frame::new(fin, op, None, Payload::Borrowed(payload)))
                .await;
        }
        assert_eq!(c.recv().await, json!({"type": "pong"}), "{path}");
        // A continuation with nothing to continue fails the connection
        // (RFC 6455 §5.4): the error, then 1002.
        c.send_frame(Frame::new(
            true,
            OpCode::Continuation,
            None,
            Payload::Borrowed(b"x"),
        ))
        .await;
        assert_error(dialect, &c.recv().await, "bad_frame");
        match c.next_seen(WAIT).await {
            Some(Seen::Close(code)) => assert_eq!(code, 1002, "{path}"),
            other => panic!("{path}: expected close 1002, got {other:?}"),
        }
        let mut c = connect_ready(node.addr, path, &tok).await;

        // An unmasked client frame cannot be trusted to be in sync: an
        // error in the dialect's shape, then close 1002; others unaffected.
        let mut bystander = connect_ready(node.addr, path, &tok).await;
        c.send_unmasked(Frame::text(Payload::Borrowed(br#"{"type":"ping"}"#)))
            .await;
        assert_error(dialect, &c.recv().await, "bad_frame");
        match c.next_seen(WAIT).await {
            Some(Seen::Close(code)) => assert_eq!(code, 1002, "{path}"),
            other => panic!("{path}: expected close 1002, got {other:?}"),
        }
        node.publish(r, "after-bad-frame", json!({})).await;
        assert_eq!(bystander.recv().await["type"], "after-bad-frame");
    }
}
