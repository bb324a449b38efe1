//! Server → client frames, encoded once into `Bytes` (header included) so the
//! same buffer can be queued to every socket of a dialect and the writer can
//! send a batch of them in one vectored write.

use bytes::Bytes;
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

pub fn close(code: u16, reason: &str) -> Bytes {
    encode(Frame::close(code, reason.as_bytes()))
}

pub fn ping() -> Bytes {
    encode(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b"")))
}

pub fn pong(payload: &[u8]) -> Bytes {
    encode(Frame::pong(Payload::Owned(payload.to_vec())))
}

#[cfg(test)]
mod tests {
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
