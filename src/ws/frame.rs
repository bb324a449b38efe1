//! WebSocket frames (RFC 6455 §5).
//!
//! - Server → client frames are encoded once into `Bytes` (header included)
//!   so the same buffer can go to every socket of a dialect, and a backlog
//!   can leave in one vectored write.
//! - Client → server frames are decoded by [`decode`] from the socket's own
//!   read buffer. We read frames ourselves rather than through
//!   fastwebsockets' reader because that reader keeps an 8 KiB buffer per
//!   socket for the socket's whole life; ours holds no memory while a socket
//!   is idle (see `ws::conn`). Unmasking uses fastwebsockets' SIMD `unmask`.

use bytes::{Buf, Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload};

fn encode(mut frame: Frame<'_>) -> Bytes {
    let mut buf = Vec::new();
    let n = frame.write(&mut buf).len();
    buf.truncate(n);
    Bytes::from(buf)
}

pub fn text(payload: Vec<u8>) -> Bytes {
    encode(Frame::text(Payload::Owned(payload)))
}

/// Only the Autobahn echo testee sends binary frames.
#[cfg_attr(not(feature = "autobahn"), allow(dead_code))]
pub fn binary(payload: Vec<u8>) -> Bytes {
    encode(Frame::binary(Payload::Owned(payload)))
}

pub fn close(code: u16, reason: &str) -> Bytes {
    encode(Frame::close(code, reason.as_bytes()))
}

pub fn ping() -> Bytes {
    encode(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b"")))
}

pub fn pong(payload: &[u8]) -> Bytes {
    encode(Frame::pong(Payload::Owned(payload.to_vec())))
}

/// The opcodes a client may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

/// One decoded, unmasked client frame.
#[derive(Debug)]
pub struct InFrame {
    pub fin: bool,
    pub op: Op,
    pub payload: BytesMut,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The declared payload length is over the cap: the stream cannot be
    /// resynced without reading it, so the socket must close (1009).
    TooLarge(u64),
    /// Not a valid client frame (unmasked, reserved bits, unknown opcode, a
    /// fragmented or long control frame): close 1002.
    Protocol(&'static str),
}

/// Takes one whole frame off the front of `buf`. `Ok(None)` means more
/// bytes are needed; `need` is then set to the frame's full size when the
/// header has arrived (so the caller can reserve it at once).
pub fn decode(
    buf: &mut BytesMut,
    cap: usize,
    need: &mut usize,
) -> Result<Option<InFrame>, DecodeError> {
    *need = 0;
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(DecodeError::Protocol(
            "reserved bits set (no extension was negotiated)",
        ));
    }
    let op = match b0 & 0x0f {
        0x0 => Op::Continuation,
        0x1 => Op::Text,
        0x2 => Op::Binary,
        0x8 => Op::Close,
        0x9 => Op::Ping,
        0xa => Op::Pong,
        _ => return Err(DecodeError::Protocol("unknown opcode")),
    };
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(DecodeError::Protocol("client frames must be masked"));
    }
    let (len, header) = match b1 & 0x7f {
        126 if buf.len() < 4 => return Ok(None),
        126 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() < 10 => return Ok(None),
        127 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n), 10)
        }
        n => (u64::from(n), 2),
    };
    if matches!(op, Op::Close | Op::Ping | Op::Pong) && (!fin || len > 125) {
        return Err(DecodeError::Protocol(
            "control frames must be whole and at most 125 bytes",
        ));
    }
    if len > cap as u64 {
        return Err(DecodeError::TooLarge(len));
    }
    // Checked: under a cap near `usize::MAX` a declared 2^64-1 overflowed
    // here (found by the fuzz target; the node's caps are far below, as
    // MAX_FRAME_BYTES is at most 16 MiB, but `decode` takes any cap).
    let Some(total) = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(header + 4))
    else {
        return Err(DecodeError::TooLarge(len));
    };
    if buf.len() < total {
        *need = total;
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[header..header + 4]);
    buf.advance(header + 4);
    let mut payload = buf.split_to(len as usize);
    fastwebsockets::unmask(&mut payload, mask);
    Ok(Some(InFrame { fin, op, payload }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame, as a browser would send it.
    fn client(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn decodes_frames_split_anywhere() {
        let big = vec![b'y'; 70_000];
        let mut wire = client(0x81, b"hello");
        wire.extend(client(0x01, b"frag"));
        wire.extend(client(0x89, b"p"));
        wire.extend(client(0x80, b"ment"));
        wire.extend(client(0x82, &big));
        wire.extend(client(0x81, &big[..300]));
        let want: Vec<(bool, Op, &[u8])> = vec![
            (true, Op::Text, b"hello"),
            (false, Op::Text, b"frag"),
            (true, Op::Ping, b"p"),
            (true, Op::Continuation, b"ment"),
            (true, Op::Binary, &big),
            (true, Op::Text, &big[..300]),
        ];
        // Fed in chunks of every size from 1 byte up.
        for chunk in [1, 2, 3, 7, 100, 4096, wire.len()] {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut need = 0;
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(f) = decode(&mut buf, 100_000, &mut need).unwrap() {
                    got.push((f.fin, f.op, f.payload.to_vec()));
                }
                assert!(need == 0 || need > buf.len());
            }
            assert!(buf.is_empty());
            assert_eq!(got.len(), want.len(), "chunk {chunk}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!((g.0, g.1, &g.2[..]), (w.0, w.1, w.2), "chunk {chunk}");
            }
        }
    }

    /// Found by the fuzz target: a declared length of 2^64-1 under a cap
    /// of `usize::MAX` overflowed the frame's size (a panic in a debug
    /// build, a wrong size in a release one). Unreachable from a node,
    /// whose caps follow MAX_FRAME_BYTES (≤ 16 MiB).
    #[test]
    fn a_length_near_u64_max_is_too_large_whatever_the_cap() {
        let mut b = vec![0x81, 0x80 | 127];
        b.extend_from_slice(&u64::MAX.to_be_bytes());
        b.extend_from_slice(&[1, 2, 3, 4, b'x']);
        let mut buf = BytesMut::from(&b[..]);
        let mut need = 0;
        assert_eq!(
            decode(&mut buf, usize::MAX, &mut need).unwrap_err(),
            DecodeError::TooLarge(u64::MAX)
        );
    }

    #[test]
    fn refuses_what_a_client_may_not_send() {
        let mut need = 0;
        let refused: [(&str, Vec<u8>, usize); 5] = [
            ("unmasked", vec![0x81, 1, b'x'], 10),
            ("reserved bits", client(0xc1, b"x"), 10),
            ("unknown opcode", client(0x83, b"x"), 10),
            ("fragmented ping", client(0x09, b"x"), 10),
            ("126-byte ping", client(0x89, &[0; 126]), 1000),
        ];
        for (what, wire, cap) in refused {
            let mut buf = BytesMut::from(&wire[..]);
            assert!(
                matches!(
                    decode(&mut buf, cap, &mut need),
                    Err(DecodeError::Protocol(_))
                ),
                "{what}"
            );
        }
        // Over the cap: refused from the header alone.
        let mut huge = BytesMut::from(&client(0x81, &[0; 2000])[..20]);
        assert!(matches!(
            decode(&mut huge, 1999, &mut need),
            Err(DecodeError::TooLarge(2000))
        ));
    }

    #[test]
    fn text_frame_layout() {
        let f = super::text(b"hi".to_vec());
        assert_eq!(&f[..], &[0x81, 2, b'h', b'i']);
        let big = super::text(vec![b'x'; 300]);
        assert_eq!(&big[..4], &[0x81, 126, 1, 44]);
        assert_eq!(big.len(), 304);
        let c = super::close(4001, "no");
        assert_eq!(&c[..], &[0x88, 4, 0x0f, 0xa1, b'n', b'o']);
    }
}
