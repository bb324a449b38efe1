//! RFC 6455 over real sockets (SPEC §11): fragmentation errors fail the
//! connection with 1002, invalid UTF-8 with 1007 as soon as it arrives,
//! close frames are checked and the peer's code echoed, and a message over
//! the hard cap ends in a clean 1009 closing handshake.

use fastwebsockets::{Frame, OpCode, Payload};

use crate::common::*;
use crate::{ENDPOINTS, member};

async fn close_code_after(c: &mut Client) -> u16 {
    loop {
        match c.next_seen(WAIT).await {
            Some(Seen::Close(code)) => return code,
            Some(Seen::Json(_)) => continue, // the dialect's error may come first
            None => panic!("not closed within {WAIT:?}"),
        }
    }
}

fn frame(fin: bool, op: OpCode, payload: &[u8]) -> Frame<'_> {
    Frame::new(fin, op, None, Payload::Borrowed(payload))
}

#[tokio::test]
async fn protocol_errors_fail_the_connection_with_the_rfc_code() {
    init_tracing();
    let db = TestDb::sqlite();
    let node = TestNode::start(config(&db, None, "rfc")).await;
    type Case = (&'static str, Vec<(bool, OpCode, Vec<u8>)>, u16);
    let cases: Vec<Case> = vec![
        (
            "a new text frame inside a fragmented message",
            vec![
                (false, OpCode::Text, b"{\"a\":".to_vec()),
                (true, OpCode::Text, b"1}".to_vec()),
            ],
            1002,
        ),
        (
            "a continuation with no message started",
            vec![(true, OpCode::Continuation, b"x".to_vec())],
            1002,
        ),
        (
            // Fails fast: the message is not finished when 0xff arrives.
            "invalid UTF-8 in the first fragment",
            vec![(false, OpCode::Text, vec![b'{', 0xff])],
            1007,
        ),
        (
            "invalid UTF-8 in a whole message",
            vec![(true, OpCode::Text, vec![0xc0, 0xaf])],
            1007,
        ),
        (
            "a close frame of one byte",
            vec![(true, OpCode::Close, vec![3])],
            1002,
        ),
        (
            "close code 1005 (reserved)",
            vec![(true, OpCode::Close, 1005u16.to_be_bytes().to_vec())],
            1002,
        ),
        (
            "close code 999",
            vec![(true, OpCode::Close, 999u16.to_be_bytes().to_vec())],
            1002,
        ),
        (
            "a close reason that is not UTF-8",
            vec![(true, OpCode::Close, vec![0x03, 0xe8, 0xff, 0xfe])],
            1007,
        ),
        (
            "a valid close code is echoed",
            vec![(true, OpCode::Close, 3000u16.to_be_bytes().to_vec())],
            3000,
        ),
        (
            "an empty close is answered 1000",
            vec![(true, OpCode::Close, vec![])],
            1000,
        ),
    ];
    for (dialect, path) in ENDPOINTS {
        let (tok, _) = member(dialect);
        for (what, frames, want) in &cases {
            let mut c = connect_ready(node.addr, path, &tok).await;
            for (fin, op, payload) in frames {
                c.send_frame(frame(*fin, *op, payload)).await;
            }
            assert_eq!(close_code_after(&mut c).await, *want, "{path}: {what}");
        }
    }
}

/// A message over the hard cap while the client is still sending it: 1009
/// and a closing handshake, not a connection reset.
#[tokio::test]
async fn a_message_over_the_hard_cap_closes_1009_cleanly() {
    init_tracing();
    let db = TestDb::sqlite();
    let mut cfg = config(&db, None, "rfc");
    cfg.max_frame_bytes = 1024; // hard cap 256 KiB
    let node = TestNode::start(cfg).await;
    for (dialect, path) in ENDPOINTS {
        let (tok, _) = member(dialect);
        let mut c = connect_ready(node.addr, path, &tok).await;
        // 2 MiB in 64 KiB fragments: the server refuses after ~256 KiB, while
        // the client is still writing.
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent_all = true;
        for i in 0..32 {
            let op = if i == 0 {
                OpCode::Text
            } else {
                OpCode::Continuation
            };
            if c.try_send_frame(frame(i == 31, op, &chunk)).await.is_err() {
                sent_all = false;
                break;
            }
        }
        let _ = sent_all;
        assert_eq!(close_code_after(&mut c).await, 1009, "{path}");
    }
}
