//! From client frames to messages, by RFC 6455's rules (§5.4 fragmentation,
//! §5.5.1 close, §8.1 UTF-8): what a socket must answer, and when it must
//! fail the connection with which code. Pure: no IO, so every rule has a
//! unit test here, and the product's sockets and the Autobahn echo testee
//! run the same code.

use bytes::BytesMut;

use super::frame::{InFrame, Op};
use super::outbox::close_code;

/// What a frame comes to.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Part of a message: nothing to do yet.
    More,
    /// A whole message (text is valid UTF-8).
    Message {
        text: bool,
        payload: Vec<u8>,
    },
    /// Answer with a pong carrying this payload.
    Ping(Vec<u8>),
    Pong,
    /// The peer closes: answer with this code (its own, or 1000 when it
    /// gave none) and close.
    Close(u16),
    /// Fail the connection: send this close code (with the reason as the
    /// error message) and close.
    Fail(u16, &'static str),
}

/// A fragmented message being reassembled.
struct Partial {
    text: bool,
    buf: Vec<u8>,
    /// `buf[..checked]` is known to be valid UTF-8 (text messages are
    /// checked as fragments arrive, so a bad byte fails fast).
    checked: usize,
}

/// One socket's reassembly state.
#[derive(Default)]
pub struct Assembler {
    partial: Option<Partial>,
}

/// Whether a close code may appear in a close frame (RFC 6455 §7.4): the
/// defined codes a peer may send, and the ranges for libraries (3000–3999)
/// and applications (4000–4999). 1004–1006 and 1015 are reserved, 1012–1014
/// were unassigned when the RFC (and the Autobahn suite) was written.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// Checks `buf[from..]` as the continuation of valid UTF-8: `Ok(end)` is the
/// end of the valid prefix (an incomplete sequence at the very end is
/// allowed unless `last`), `Err` when a byte can never be valid.
fn check_utf8(buf: &[u8], from: usize, last: bool) -> Result<usize, ()> {
    match std::str::from_utf8(&buf[from..]) {
        Ok(_) => Ok(buf.len()),
        Err(e) if e.error_len().is_none() && !last => Ok(from + e.valid_up_to()),
        Err(_) => Err(()),
    }
}

impl Assembler {
    /// Bytes of the message being reassembled.
    pub fn pending(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.buf.len())
    }

    /// Feeds one frame. `cap` bounds a whole message (1009 above it).
    pub fn push(&mut self, frame: InFrame, cap: usize) -> Step {
        match frame.op {
            Op::Ping => Step::Ping(frame.payload.to_vec()),
            Op::Pong => Step::Pong,
            Op::Close => close_step(&frame.payload),
            Op::Text | Op::Binary => {
                if self.partial.is_some() {
                    return Step::Fail(
                        close_code::PROTOCOL_ERROR,
                        "a new message began inside a fragmented one",
                    );
                }
                self.start(frame.op == Op::Text, frame.fin, frame.payload, cap)
            }
            Op::Continuation => {
                let Some(mut p) = self.partial.take() else {
                    return Step::Fail(
                        close_code::PROTOCOL_ERROR,
                        "a continuation frame with no message started",
                    );
                };
                if p.buf.len() + frame.payload.len() > cap {
                    return Step::Fail(close_code::MESSAGE_TOO_BIG, "message too big");
                }
                p.buf.extend_from_slice(&frame.payload);
                self.settle(p, frame.fin)
            }
        }
    }

    fn start(&mut self, text: bool, fin: bool, payload: BytesMut, cap: usize) -> Step {
        if payload.len() > cap {
            return Step::Fail(close_code::MESSAGE_TOO_BIG, "message too big");
        }
        let p = Partial {
            text,
            buf: payload.to_vec(),
            checked: 0,
        };
        self.settle(p, fin)
    }

    /// Validates what arrived and either completes the message or keeps it.
    fn settle(&mut self, mut p: Partial, fin: bool) -> Step {
        if p.text {
            // Back up to the last possibly incomplete sequence.
            match check_utf8(&p.buf, p.checked, fin) {
                Ok(end) => p.checked = end,
                Err(()) => {
                    return Step::Fail(close_code::INVALID_DATA, "text messages must be UTF-8");
                }
            }
        }
        if fin {
            Step::Message {
                text: p.text,
                payload: p.buf,
            }
        } else {
            self.partial = Some(p);
            Step::More
        }
    }
}

/// The rules for a close frame's payload: empty, or a valid code and a
/// UTF-8 reason.
fn close_step(payload: &[u8]) -> Step {
    match payload.len() {
        0 => Step::Close(close_code::NORMAL),
        1 => Step::Fail(close_code::PROTOCOL_ERROR, "a close frame of one byte"),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !valid_close_code(code) {
                Step::Fail(close_code::PROTOCOL_ERROR, "an invalid close code")
            } else if std::str::from_utf8(&payload[2..]).is_err() {
                Step::Fail(close_code::INVALID_DATA, "a close reason that is not UTF-8")
            } else {
                Step::Close(code)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(fin: bool, op: Op, payload: &[u8]) -> InFrame {
        InFrame {
            fin,
            op,
            payload: BytesMut::from(payload),
        }
    }

    fn msg(text: bool, p: &[u8]) -> Step {
        Step::Message {
            text,
            payload: p.to_vec(),
        }
    }

    #[test]
    fn fragments_reassemble_with_control_frames_between() {
        let mut a = Assembler::default();
        assert_eq!(a.push(f(false, Op::Text, b"he"), 100), Step::More);
        assert_eq!(
            a.push(f(true, Op::Ping, b"x"), 100),
            Step::Ping(b"x".to_vec())
        );
        assert_eq!(a.push(f(false, Op::Continuation, b"l"), 100), Step::More);
        assert_eq!(a.pending(), 3);
        assert_eq!(
            a.push(f(true, Op::Continuation, b"lo"), 100),
            msg(true, b"hello")
        );
        assert_eq!(
            a.push(f(true, Op::Binary, &[0xff]), 100),
            msg(false, &[0xff])
        );
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn fragmentation_errors_fail_with_1002() {
        let mut a = Assembler::default();
        assert_eq!(
            a.push(f(true, Op::Continuation, b"x"), 100),
            Step::Fail(1002, "a continuation frame with no message started")
        );
        let mut a = Assembler::default();
        a.push(f(false, Op::Text, b"x"), 100);
        assert!(matches!(
            a.push(f(true, Op::Text, b"y"), 100),
            Step::Fail(1002, _)
        ));
        let mut a = Assembler::default();
        a.push(f(false, Op::Binary, b"x"), 100);
        assert!(matches!(
            a.push(f(false, Op::Binary, b"y"), 100),
            Step::Fail(1002, _)
        ));
    }

    #[test]
    fn invalid_utf8_fails_fast_with_1007_and_split_sequences_pass() {
        // "€" is e2 82 ac: split across fragments it is valid.
        let mut a = Assembler::default();
        assert_eq!(a.push(f(false, Op::Text, &[b'a', 0xe2]), 100), Step::More);
        assert_eq!(a.push(f(false, Op::Continuation, &[0x82]), 100), Step::More);
        assert_eq!(
            a.push(f(true, Op::Continuation, &[0xac]), 100),
            msg(true, "a€".as_bytes())
        );
        // A byte that can never start valid UTF-8 fails at once, before the
        // message is complete.
        let mut a = Assembler::default();
        assert!(matches!(
            a.push(f(false, Op::Text, &[b'a', 0xff]), 100),
            Step::Fail(1007, _)
        ));
        // A truncated sequence at the end of the message fails.
        let mut a = Assembler::default();
        assert!(matches!(
            a.push(f(true, Op::Text, &[0xe2, 0x82]), 100),
            Step::Fail(1007, _)
        ));
        // Binary is not checked.
        let mut a = Assembler::default();
        assert_eq!(
            a.push(f(true, Op::Binary, &[0xff]), 100),
            msg(false, &[0xff])
        );
    }

    #[test]
    fn messages_over_the_cap_fail_with_1009() {
        let mut a = Assembler::default();
        assert!(matches!(
            a.push(f(true, Op::Text, &[b'a'; 11]), 10),
            Step::Fail(1009, _)
        ));
        let mut a = Assembler::default();
        assert_eq!(a.push(f(false, Op::Text, &[b'a'; 6]), 10), Step::More);
        assert!(matches!(
            a.push(f(true, Op::Continuation, &[b'a'; 6]), 10),
            Step::Fail(1009, _)
        ));
    }

    #[test]
    fn close_frames_follow_rfc_6455() {
        let close = |p: &[u8]| close_step(p);
        assert_eq!(close(b""), Step::Close(1000));
        assert!(matches!(close(&[3]), Step::Fail(1002, _)));
        for ok in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        ] {
            assert_eq!(close(&ok.to_be_bytes()), Step::Close(ok), "{ok}");
        }
        for bad in [
            0u16, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 1100, 2000, 2999, 5000,
        ] {
            assert!(
                matches!(close(&bad.to_be_bytes()), Step::Fail(1002, _)),
                "{bad}"
            );
        }
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice("bye ✓".as_bytes());
        assert_eq!(close(&p), Step::Close(1000));
        p.push(0xff);
        assert!(matches!(close(&p), Step::Fail(1007, _)));
    }
}
