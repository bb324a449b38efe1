//! Fuzz targets that run under `cargo test` (test builds only): the frame
//! decoder and assembler, each dialect's parser, and token extraction and
//! verification. Each target mutates a corpus seeded from the seed
//! documents' example messages (`tests/fuzz_corpus/`) with a seeded RNG,
//! for a bounded number of cases and seconds, and checks properties:
//!
//! - nothing panics (a panic is the failure; the case is printed with the
//!   seed that reproduces it);
//! - the decoder never yields a frame, and the assembler never a message,
//!   larger than the cap; text messages are valid UTF-8; a stream fed in
//!   random pieces decodes to the same frames as the whole stream;
//! - parse errors are errors with a code and a bounded message (a client's
//!   input is never echoed at length);
//! - a refused token is told in our own words, never jsonwebtoken's.
//!
//! A plain RNG loop rather than a fuzzing crate: the targets are pure
//! functions over bytes, a mutation loop covers them, and it adds no
//! dependency. `FUZZ_SEED` (a number) replays one run; `FUZZ_ITERS` and
//! `FUZZ_SECS` bound each target (defaults 20,000 cases and 5 s, so the whole
//! step stays well under a minute in CI on 2 cores). Deeper runs:
//! `FUZZ_ITERS=1000000 FUZZ_SECS=600 cargo test -p switchboard --lib fuzz`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::assemble::{Assembler, Step};
use super::dialect::{Command, Dialect};
use super::frame::{self, DecodeError, InFrame, Op};
use crate::auth::{AuthError, Verifier};
use crate::config::{Config, JwtKey};

/// Cases per target and seconds per target, and the run's seed.
struct Budget {
    iters: u64,
    secs: f64,
    seed: u64,
}

fn budget() -> Budget {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<f64>().ok());
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            // A new seed each run (printed on failure), so CI explores.
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    Budget {
        iters: env("FUZZ_ITERS").map_or(20_000, |n| n as u64),
        secs: env("FUZZ_SECS").unwrap_or(5.0),
        seed,
    }
}

/// Runs `case` with a fresh RNG per case (seed + index, so one failing case
/// replays alone) until the budget is spent. A panic inside a case is
/// reported with its seed, then re-raised.
fn run(name: &str, mut case: impl FnMut(&mut StdRng)) -> u64 {
    let b = budget();
    let deadline = Instant::now() + Duration::from_secs_f64(b.secs);
    let mut n = 0;
    while n < b.iters && Instant::now() < deadline {
        let seed = b.seed.wrapping_add(n);
        let mut rng = StdRng::seed_from_u64(seed);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&mut rng)));
        if let Err(p) = r {
            eprintln!(
                "fuzz target {name}: case {n} failed; replay with FUZZ_SEED={seed} FUZZ_ITERS=1"
            );
            std::panic::resume_unwind(p);
        }
        n += 1;
    }
    assert!(n > 0, "fuzz target {name} ran no case");
    eprintln!(
        "fuzz target {name}: {n} cases in {:.1} s (seed {})",
        b.secs
            - deadline
                .saturating_duration_since(Instant::now())
                .as_secs_f64(),
        b.seed
    );
    n
}

fn corpus(dir: &str) -> Vec<Vec<u8>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(dir);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x != "md"))
        .map(|e| std::fs::read(e.path()).expect("corpus file"))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "empty corpus {}", path.display());
    out
}

/// Bytes that tend to matter to parsers.
const INTERESTING: &[u8] = &[
    0x00, 0x7f, 0x80, 0xff, 0xc0, 0xed, 0xf4, 0xf8, b'"', b'\\', b'{', b'}', b'[', b']', b':',
    b',', b'.', b'-', b'e', b'%', b'=', b'&', b'?', b'/', b' ', b'\n', 126, 127, 125,
];

/// JSON values that tend to matter to the dialects.
fn interesting_json(rng: &mut StdRng) -> Value {
    match rng.random_range(0..16) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(1e308),
        4 => json!(u64::MAX),
        5 => json!(i64::MIN),
        6 => json!(""),
        7 => json!("x".repeat(rng.random_range(60..300))),
        8 => json!([]),
        9 => json!({}),
        10 => json!("NaN"),
        11 => json!(" 41.3 "),
        12 => json!({"epoch": "e", "offset": -1}),
        13 => json!("admin-orders"),
        14 => {
            // Deep nesting (serde_json stops at 128 levels).
            let mut v = json!(1);
            for _ in 0..rng.random_range(1..200) {
                v = json!([v]);
            }
            v
        }
        _ => json!(rng.random::<f64>() * 400.0 - 200.0),
    }
}

/// A random node of `v` (by a walk down) replaced, or a key added.
fn mutate_json(rng: &mut StdRng, v: &mut Value) {
    let go_down = rng.random_bool(0.6);
    match v {
        Value::Object(m) if !m.is_empty() && go_down => {
            let i = rng.random_range(0..m.len());
            if let Some(child) = m.values_mut().nth(i) {
                mutate_json(rng, child);
            }
        }
        Value::Array(a) if !a.is_empty() && go_down => {
            let i = rng.random_range(0..a.len());
            mutate_json(rng, &mut a[i]);
        }
        Value::Object(m) if rng.random_bool(0.3) => {
            let keys = [
                "type",
                "data",
                "payload",
                "roomId",
                "room",
                "since",
                "latitude",
                "longitude",
                "heading",
                "speed",
                "epoch",
                "offset",
            ];
            let k = keys[rng.random_range(0..keys.len())];
            m.insert(k.to_string(), interesting_json(rng));
        }
        _ => *v = interesting_json(rng),
    }
}

/// Byte-level mutations: flips, interesting bytes, inserts, deletes,
/// duplicated ranges, splices with `other`, truncation.
fn mutate_bytes(rng: &mut StdRng, b: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..rng.random_range(1..6) {
        let len = b.len();
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                b[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                b[i] = INTERESTING[rng.random_range(0..INTERESTING.len())];
            }
            2 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..16);
                let ins: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                b.splice(i..i, ins);
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                let j = rng.random_range(i..=len);
                b.drain(i..j);
            }
            4 if len > 0 => {
                let i = rng.random_range(0..len);
                let j = rng.random_range(i..=len.min(i + 64));
                let chunk = b[i..j].to_vec();
                let at = rng.random_range(0..=b.len());
                b.splice(at..at, chunk);
            }
            5 if !other.is_empty() => {
                let i = rng.random_range(0..=len);
                let j = rng.random_range(0..=other.len());
                b.truncate(i);
                b.extend_from_slice(&other[j..]);
            }
            6 if len > 0 => b.truncate(rng.random_range(0..len)),
            _ => {
                let i = rng.random_range(0..=len);
                b.insert(i, INTERESTING[rng.random_range(0..INTERESTING.len())]);
            }
        }
    }
}

/// A corpus entry, mutated as JSON, as bytes, both, or not at all.
fn mutated(rng: &mut StdRng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let base = &corpus[rng.random_range(0..corpus.len())];
    let other = &corpus[rng.random_range(0..corpus.len())];
    let mut b = base.clone();
    if rng.random_bool(0.5)
        && let Ok(mut v) = serde_json::from_slice::<Value>(&b)
    {
        for _ in 0..rng.random_range(1..4) {
            mutate_json(rng, &mut v);
        }
        b = serde_json::to_vec(&v).expect("a Value serializes");
    }
    if rng.random_bool(0.6) {
        mutate_bytes(rng, &mut b, other);
    }
    b
}

// ---------------------------------------------------------------- frames

/// One client frame on the wire: FIN, RSV bits, opcode, masked (or not)
/// payload, the length in the 7-bit, 16-bit or 64-bit form (a declared
/// length may lie).
fn wire_frame(rng: &mut StdRng, b0: u8, payload: &[u8], masked: bool, declared: u64) -> Vec<u8> {
    let mut out = vec![b0];
    let m = if masked { 0x80 } else { 0 };
    if declared < 126 && rng.random_bool(0.8) {
        out.push(m | declared as u8);
    } else if declared <= u64::from(u16::MAX) && rng.random_bool(0.7) {
        out.push(m | 126);
        out.extend_from_slice(&(declared as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&declared.to_be_bytes());
    }
    let mask: [u8; 4] = rng.random();
    if masked {
        out.extend_from_slice(&mask);
    }
    out.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, b)| if masked { b ^ mask[i % 4] } else { *b }),
    );
    out
}

/// A stream of client frames: messages from the corpus whole or in
/// fragments, control frames between them, close frames, and the odd
/// protocol error (reserved bits, unknown opcodes, unmasked, a lying or
/// huge length, a continuation out of place), then maybe byte mutations.
fn frame_stream(rng: &mut StdRng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.random_range(1..8) {
        let fin_op = |fin: bool, op: u8| if fin { 0x80 | op } else { op };
        match rng.random_range(0..10) {
            0..=3 => {
                // A message, whole or fragmented, maybe with pings inside.
                let msg = mutated(rng, corpus);
                let op = if rng.random_bool(0.85) { 0x1 } else { 0x2 };
                let pieces = rng.random_range(1..5usize).min(msg.len().max(1));
                let mut cuts: Vec<usize> = (1..pieces)
                    .map(|_| rng.random_range(0..=msg.len()))
                    .collect();
                cuts.sort();
                cuts.insert(0, 0);
                cuts.push(msg.len());
                for w in 0..pieces {
                    let part = &msg[cuts[w]..cuts[w + 1]];
                    let fin = w + 1 == pieces;
                    let code = if w == 0 { op } else { 0x0 };
                    out.extend(wire_frame(
                        rng,
                        fin_op(fin, code),
                        part,
                        true,
                        part.len() as u64,
                    ));
                    if !fin && rng.random_bool(0.2) {
                        out.extend(wire_frame(rng, 0x89, b"hi", true, 2));
                    }
                }
            }
            4 => {
                let n = if rng.random_bool(0.9) {
                    rng.random_range(0..=125)
                } else {
                    rng.random_range(126..300)
                };
                let p: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                let op = if rng.random_bool(0.5) { 0x9 } else { 0xa };
                let fin = rng.random_bool(0.95);
                out.extend(wire_frame(rng, fin_op(fin, op), &p, true, n as u64));
            }
            5 => {
                let mut p = Vec::new();
                match rng.random_range(0..4) {
                    0 => {}
                    1 => p.push(rng.random()),
                    2 => p.extend_from_slice(&rng.random::<u16>().to_be_bytes()),
                    _ => {
                        p.extend_from_slice(&[0x03, 0xe8]);
                        p.extend((0..rng.random_range(0..20)).map(|_| rng.random::<u8>()));
                    }
                }
                out.extend(wire_frame(rng, 0x88, &p, true, p.len() as u64));
            }
            6 => {
                // A continuation out of place, or a new message inside one.
                let op = if rng.random_bool(0.5) { 0x0 } else { 0x1 };
                let fin = rng.random_bool(0.5);
                out.extend(wire_frame(rng, fin_op(fin, op), b"{}", true, 2));
            }
            7 => {
                // Reserved bits or an unknown opcode.
                let b0 = rng.random::<u8>() | 0x80;
                out.extend(wire_frame(rng, b0, b"x", true, 1));
            }
            8 => {
                // A declared length that lies: huge, or past the stream's end.
                let declared = match rng.random_range(0..3) {
                    0 => u64::MAX - rng.random_range(0..16),
                    1 => 1 << rng.random_range(16..63),
                    _ => rng.random_range(0..100_000),
                };
                out.extend(wire_frame(rng, 0x81, b"{\"type\"", true, declared));
            }
            _ => out.extend(wire_frame(rng, 0x81, b"{}", false, 2)),
        }
    }
    if rng.random_bool(0.3) {
        let other: Vec<u8> = Vec::new();
        mutate_bytes(rng, &mut out, &other);
    }
    out
}

/// What decoding a stream came to: the frames, then how it ended.
#[derive(Debug, PartialEq)]
struct Decoded {
    frames: Vec<(bool, Op, Vec<u8>)>,
    end: Option<DecodeError>,
    rest: usize,
}

/// Decodes `stream` fed in the given pieces (`cuts` are the piece ends).
fn decode_in_pieces(stream: &[u8], cuts: &[usize], cap: usize) -> Decoded {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut need = 0;
    let mut from = 0;
    for &to in cuts.iter().chain(std::iter::once(&stream.len())) {
        buf.extend_from_slice(&stream[from..to.max(from)]);
        from = to.max(from);
        loop {
            match frame::decode(&mut buf, cap, &mut need) {
                Ok(Some(InFrame { fin, op, payload })) => {
                    assert!(
                        payload.len() <= cap,
                        "a frame of {} bytes over the cap {cap}",
                        payload.len()
                    );
                    frames.push((fin, op, payload.to_vec()));
                }
                Ok(None) => {
                    assert!(
                        need == 0 || need > buf.len(),
                        "need {need} with {} bytes in hand",
                        buf.len()
                    );
                    break;
                }
                Err(e) => {
                    return Decoded {
                        frames,
                        end: Some(e),
                        rest: 0,
                    };
                }
            }
        }
    }
    Decoded {
        frames,
        end: None,
        rest: buf.len(),
    }
}

#[test]
fn fuzz_frame_decoder_and_assembler() {
    let corpus = corpus("messages");
    let caps = [0usize, 1, 16, 125, 1024, 64 * 1024, 16 << 20, usize::MAX];
    run("frames", |rng| {
        let stream = frame_stream(rng, &corpus);
        let cap = caps[rng.random_range(0..caps.len())];
        // Whole, then in random pieces: the same frames and the same end.
        let whole = decode_in_pieces(&stream, &[], cap);
        let mut cuts: Vec<usize> = (0..rng.random_range(1..12))
            .map(|_| rng.random_range(0..=stream.len()))
            .collect();
        cuts.sort();
        let pieces = decode_in_pieces(&stream, &cuts, cap);
        assert_eq!(
            whole,
            pieces,
            "pieces at {cuts:?} of {} bytes",
            stream.len()
        );
        // The assembler over the frames: no message over the cap, text is
        // UTF-8, and a failure or close ends the connection.
        let mut asm = Assembler::default();
        for (fin, op, payload) in whole.frames {
            let step = asm.push(
                InFrame {
                    fin,
                    op,
                    payload: BytesMut::from(&payload[..]),
                },
                cap,
            );
            assert!(
                asm.pending() <= cap,
                "{} pending over the cap",
                asm.pending()
            );
            match step {
                Step::Message { text, payload } => {
                    assert!(payload.len() <= cap, "a message over the cap");
                    if text {
                        assert!(std::str::from_utf8(&payload).is_ok(), "text not UTF-8");
                        for d in [Dialect::Rooms, Dialect::Events, Dialect::Driver] {
                            let _ = d.parse(&payload);
                        }
                    }
                }
                Step::Ping(p) => assert!(p.len() <= 125),
                Step::Close(code) => {
                    assert!(super::assemble::valid_close_code(code));
                    break;
                }
                Step::Fail(code, why) => {
                    assert!(matches!(code, 1002 | 1007 | 1009), "{code} {why}");
                    break;
                }
                Step::More | Step::Pong => {}
            }
        }
    });
}

// ---------------------------------------------------------------- dialects

fn check_parse(d: Dialect, input: &[u8]) {
    match d.parse(input) {
        Ok(Command::Location(p)) => {
            assert!(p.latitude().is_finite() && p.latitude().abs() <= 90.0);
            assert!(p.longitude().is_finite() && p.longitude().abs() <= 180.0);
        }
        Ok(Command::JoinRoom {
            since, bad_since, ..
        }) => {
            if let Some(s) = since {
                assert!(s.epoch.len() <= 64 && !bad_since);
            }
        }
        Ok(Command::Ping | Command::LeaveRoom(_)) => {}
        Err(e) => {
            assert!(!e.code().is_empty());
            let msg = e.to_string();
            // Never the client's input echoed at length.
            assert!(msg.len() <= 512, "{} bytes of error message", msg.len());
        }
    }
}

#[test]
fn fuzz_dialect_parsers() {
    let corpus = corpus("messages");
    run("dialects", |rng| {
        let input = mutated(rng, &corpus);
        for d in [Dialect::Rooms, Dialect::Events, Dialect::Driver] {
            check_parse(d, &input);
        }
    });
}

// ---------------------------------------------------------------- tokens

const SECRET: &[u8] = b"fuzz-secret-0123456789abcdef";

fn verifier() -> Verifier {
    let mut c = Config::defaults();
    c.jwt_key = JwtKey::Secret {
        secret: SECRET.to_vec(),
        generated: false,
    };
    Verifier::new(&c).expect("verifier")
}

/// Claims with the seeds' variants and odd values in them.
fn claims(rng: &mut StdRng) -> Value {
    let mut c = match rng.random_range(0..4) {
        0 => json!({"sub": "1", "role": "admin"}),
        1 => json!({"user_id": 7, "groups": ["Driver"], "city_id": 1, "token_type": "access"}),
        2 => json!({"userId": "12", "role": "manager", "city_ids": [1, "2"]}),
        _ => json!({"sub": 3, "token_type": "refresh"}),
    };
    for _ in 0..rng.random_range(0..3) {
        mutate_json(rng, &mut c);
    }
    // Claims are an object (`mint` adds `exp` to it).
    if !c.is_object() {
        c = json!({"sub": c});
    }
    c
}

/// What a refused token may tell a client: our words only.
fn assert_our_words(e: &AuthError) {
    let msg = e.to_string();
    let fixed = [
        "missing token",
        "token expired",
        "token not yet valid",
        "invalid token",
        "wrong token type: an access token is required",
    ];
    assert!(
        fixed.contains(&msg.as_str()) || matches!(e, AuthError::Claims(_)),
        "a client would read {msg:?}"
    );
    if let AuthError::Claims(m) = e {
        assert!(m.starts_with("no integer user id in "), "{m:?}");
    }
}

#[test]
fn fuzz_token_verification() {
    let v = verifier();
    let corpus = corpus("tokens");
    run("tokens", |rng| {
        let token = if rng.random_bool(0.5) {
            // A real token (a mutated one is mostly a bad signature; a
            // mutated payload re-signed gets through to the claims).
            let c = claims(rng);
            let t = v.mint(c, rng.random_range(0..120)).expect("mint");
            let mut b = t.into_bytes();
            if rng.random_bool(0.5) {
                mutate_bytes(rng, &mut b, &[]);
            }
            String::from_utf8_lossy(&b).into_owned()
        } else {
            let mut b = corpus[rng.random_range(0..corpus.len())].clone();
            mutate_bytes(rng, &mut b, &[]);
            String::from_utf8_lossy(&b).into_owned()
        };
        match v.verify(Some(&token)) {
            Ok(id) => assert!(!id.auto_rooms().is_empty()),
            Err(e) => assert_our_words(&e),
        }
    });
}

#[test]
fn fuzz_token_extraction() {
    let queries = corpus("queries");
    let tokens = corpus("tokens");
    let v = verifier();
    run("extraction", |rng| {
        let mut target = queries[rng.random_range(0..queries.len())].clone();
        let other = &tokens[rng.random_range(0..tokens.len())];
        mutate_bytes(rng, &mut target, other);
        let target = String::from_utf8_lossy(&target).into_owned();
        let mut req = hyper::Request::builder().uri(target.as_str());
        if rng.random_bool(0.5) {
            let mut h = match rng.random_range(0..4) {
                0 => b"Bearer ".to_vec(),
                1 => b"bearer\t".to_vec(),
                2 => b"Basic ".to_vec(),
                _ => Vec::new(),
            };
            let mut t = tokens[rng.random_range(0..tokens.len())].clone();
            mutate_bytes(rng, &mut t, b" ");
            h.extend(t);
            if let Ok(value) = hyper::header::HeaderValue::from_bytes(&h) {
                req = req.header(hyper::header::AUTHORIZATION, value);
            }
        }
        // What hyper refuses never reaches the server's code.
        let Ok(req) = req.body(()) else {
            return;
        };
        let (dialect, path_token) =
            super::endpoint(req.uri().path()).map_or((None, None), |(d, t)| (Some(d), t));
        if let Some(t) = &path_token {
            assert!(!t.is_empty() && !t.contains('/'), "path token {t:?}");
        }
        let _ = dialect;
        let _ = super::bearer(&req);
        let token = super::token_of(&req, path_token);
        match super::since_of(&req) {
            super::conn::Since::Rooms(r) => assert!(r.len() <= 64),
            super::conn::Since::Bad(why) => assert!(why.len() <= 256),
            super::conn::Since::None => {}
        }
        if let Err(e) = v.verify(token.as_deref()) {
            assert_our_words(&e);
        }
    });
}
