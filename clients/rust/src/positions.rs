//! What a client has seen, per room, and how it resumes (SPEC §10). Pure:
//! no socket, no timers, so every rule is unit-tested.
//!
//! A room's position is an `epoch` (from the connect message or
//! `room-joined`) and an `offset` (from every frame that carries top-level
//! `room` and `offset`). A reconnect passes the positions as the `since`
//! query parameter ([`encode_since`]); the server then replays what was
//! missed, or says it cannot.
//!
//! A connection starts with [`Positions::begin`]; every room the client was
//! in before is then *pending* until the server says what became of it (the
//! connect message, or `room-joined` for a room joined by hand). A pending
//! room that is not reported `recovered: true` is to be resynced: the server
//! could not replay it (`epoch_changed`, `too_old`, `unavailable`), or said
//! nothing for a room it was asked about (`not_recovered`; also what a
//! refused `since` looks like, as the server's `bad_since` error follows
//! its connect message), or the client had no position to ask with
//! (`no_position`), or a `bad_since` error came before any verdict
//! (`bad_since`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// The server accepts at most this many rooms in one `since`.
pub const MAX_SINCE_ROOMS: usize = 64;

/// Where a client stands in a room's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomPosition {
    /// `None` while only frames told the offset (no connect message or
    /// `room-joined` named the room's epoch yet): not sent in `since`.
    pub epoch: Option<String>,
    pub offset: u64,
}

impl RoomPosition {
    pub fn new(epoch: &str, offset: u64) -> RoomPosition {
        RoomPosition {
            epoch: Some(epoch.to_string()),
            offset,
        }
    }

    /// `{"epoch","offset"}` from the server (the epoch may be missing).
    fn from_json(v: &Value) -> Option<RoomPosition> {
        Some(RoomPosition {
            epoch: v.get("epoch").and_then(Value::as_str).map(str::to_string),
            offset: v.get("offset")?.as_u64()?,
        })
    }

    fn to_json(&self) -> Option<Value> {
        Some(json!({"epoch": self.epoch.as_ref()?, "offset": self.offset}))
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding (RFC 4648 §5).
pub fn base64url(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// The inverse of [`base64url`] (padding optional); `None` when malformed.
pub fn from_base64url(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 2);
    for chunk in s.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            let v = B64.iter().position(|b| b == c)? as u32;
            n |= v << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

/// The `since` query value: base64url without padding of the JSON object
/// `{"<room>": {"epoch": "…", "offset": N}}`. Positions without an epoch
/// are left out, as are rooms beyond the first 64; `None` when none is left.
pub fn encode_since<'a>(
    positions: impl IntoIterator<Item = (&'a String, &'a RoomPosition)>,
) -> Option<String> {
    let m: Map<String, Value> = positions
        .into_iter()
        .filter_map(|(room, p)| Some((room.clone(), p.to_json()?)))
        .take(MAX_SINCE_ROOMS)
        .collect();
    if m.is_empty() {
        return None;
    }
    Some(base64url(Value::Object(m).to_string().as_bytes()))
}

/// Decodes a `since` value; `None` when it is not one.
pub fn decode_since(since: &str) -> Option<BTreeMap<String, RoomPosition>> {
    let v: Value = serde_json::from_slice(&from_base64url(since)?).ok()?;
    v.as_object()?
        .iter()
        .map(|(room, p)| {
            let pos = RoomPosition::from_json(p)?;
            pos.epoch.as_ref()?;
            Some((room.clone(), pos))
        })
        .collect()
}

/// Where the connect message of each dialect keeps `rooms` and `recovery`
/// (`data` of `connected`, `payload` of `CONNECTED`, top level of
/// `connection_established`); `None` for other messages.
pub fn connect_info(msg: &Value) -> Option<&Value> {
    match msg.get("type")?.as_str()? {
        "connected" => msg.get("data"),
        "CONNECTED" => msg.get("payload"),
        "connection_established" => Some(msg),
        _ => None,
    }
}

/// The `bad_since` error, in any dialect.
pub fn is_bad_since(msg: &Value) -> bool {
    let ty = msg.get("type").and_then(Value::as_str);
    if ty != Some("error") && ty != Some("ERROR") {
        return false;
    }
    let code = msg
        .get("data")
        .or_else(|| msg.get("payload"))
        .and_then(|b| b.get("code"))
        .or_else(|| msg.get("code"));
    code.and_then(Value::as_str) == Some("bad_since")
}

/// What the server said about the rooms of a resume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdicts {
    /// Rooms whose missed events are replayed, with how many.
    pub recovered: Vec<(String, u64)>,
    /// Rooms to refetch, with the reason.
    pub resync: Vec<(String, String)>,
}

impl Verdicts {
    pub fn is_empty(&self) -> bool {
        self.recovered.is_empty() && self.resync.is_empty()
    }
}

/// What one message did to the positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Nothing to do with positions, or a frame that moved one on.
    Message,
    /// A frame whose offset the client already had: drop it.
    Duplicate { room: String, offset: u64 },
    /// A connect message, `room-joined` or `bad_since`, with its verdicts.
    Verdicts(Verdicts),
}

/// Positions per room and the verdicts of each connection.
#[derive(Debug, Clone, Default)]
pub struct Positions {
    positions: BTreeMap<String, RoomPosition>,
    /// Rooms the client has been in (awaiting a verdict on the next connection).
    known: BTreeSet<String>,
    /// Rooms awaiting a verdict on this connection.
    pending: BTreeSet<String>,
    /// Rooms whose position this connection's server gave.
    confirmed: BTreeSet<String>,
    /// The rooms this connection's `since` named.
    asked: BTreeSet<String>,
}

impl Positions {
    /// Starts from saved positions (e.g. a [`Positions::snapshot`]).
    pub fn with(initial: impl IntoIterator<Item = (String, RoomPosition)>) -> Positions {
        let mut p = Positions::default();
        for (room, pos) in initial {
            if pos.epoch.is_some() {
                p.known.insert(room.clone());
                p.positions.insert(room, pos);
            }
        }
        p
    }

    pub fn get(&self, room: &str) -> Option<&RoomPosition> {
        self.positions.get(room)
    }

    /// Sets a room's position by hand (e.g. restoring one saved elsewhere).
    pub fn set(&mut self, room: &str, pos: RoomPosition) {
        self.known.insert(room.to_string());
        self.positions.insert(room.to_string(), pos);
    }

    /// The positions with an epoch (what `since` carries).
    pub fn snapshot(&self) -> BTreeMap<String, RoomPosition> {
        self.positions
            .iter()
            .filter(|(_, p)| p.epoch.is_some())
            .map(|(r, p)| (r.clone(), p.clone()))
            .collect()
    }

    /// A connection is being opened: returns the `since` query value, if
    /// any. `exclude`: rooms not to name (joined by hand, resumed by
    /// `join-room` instead).
    pub fn begin(&mut self, exclude: &BTreeSet<String>) -> Option<String> {
        self.pending = self
            .known
            .iter()
            .chain(self.positions.keys())
            .cloned()
            .collect();
        self.confirmed.clear();
        let asked: Vec<(&String, &RoomPosition)> = self
            .positions
            .iter()
            .filter(|(r, p)| !exclude.contains(*r) && p.epoch.is_some())
            .take(MAX_SINCE_ROOMS)
            .collect();
        self.asked = asked.iter().map(|(r, _)| (*r).clone()).collect();
        encode_since(asked)
    }

    /// The `since` a `join-room` of `room` may carry.
    pub fn since_for(&self, room: &str) -> Option<Value> {
        self.positions.get(room)?.to_json()
    }

    fn settle(
        &mut self,
        room: &str,
        pos: Option<RoomPosition>,
        rec: Option<&Value>,
        out: &mut Verdicts,
    ) {
        let was_pending = self.pending.remove(room);
        let mine = self.positions.get(room).filter(|p| p.epoch.is_some());
        let recovered = rec
            .and_then(|r| r.get("recovered"))
            .and_then(Value::as_bool);
        let same_epoch = |mine: &RoomPosition| {
            pos.as_ref()
                .is_none_or(|p| p.epoch.is_none() || p.epoch == mine.epoch)
        };
        if was_pending && recovered == Some(true) && mine.is_some_and(same_epoch) {
            // Replayed frames follow and move the offset on from ours.
            let missed = rec.and_then(|r| r.get("missed")).and_then(Value::as_u64);
            out.recovered.push((room.to_string(), missed.unwrap_or(0)));
        } else {
            // A room already followed on this connection (joined twice)
            // keeps its own offset: frames in flight still move it on.
            let keep = !was_pending
                && mine.is_some_and(|m| pos.as_ref().is_some_and(|p| p.epoch == m.epoch));
            if let Some(p) = pos
                && !keep
            {
                self.positions.insert(room.to_string(), p);
            }
            if was_pending {
                let reason = match (recovered, rec.and_then(|r| r.get("reason"))) {
                    (Some(false), Some(Value::String(r))) => r.clone(),
                    _ if self.asked.contains(room) => "not_recovered".to_string(),
                    _ => "no_position".to_string(),
                };
                out.resync.push((room.to_string(), reason));
            }
        }
        self.known.insert(room.to_string());
        self.confirmed.insert(room.to_string());
    }

    /// The connect message's `rooms` and `recovery`. `manual`: rooms joined
    /// by hand (they get their verdict from `room-joined`); any other
    /// pending room the socket was not put in is forgotten.
    pub fn on_connect(
        &mut self,
        rooms: Option<&Value>,
        recovery: Option<&Value>,
        manual: &BTreeSet<String>,
    ) -> Verdicts {
        let mut out = Verdicts::default();
        let Some(rooms) = rooms.and_then(Value::as_object) else {
            return out; // a server without history
        };
        for (room, pos) in rooms {
            let rec = recovery.and_then(|r| r.get(room));
            self.settle(room, RoomPosition::from_json(pos), rec, &mut out);
        }
        let gone: Vec<String> = self
            .pending
            .iter()
            .filter(|r| !manual.contains(*r) && !rooms.contains_key(*r))
            .cloned()
            .collect();
        for room in gone {
            self.forget(&room);
        }
        out
    }

    /// `room-joined` `{roomId, epoch, offset, recovery?}` (`recovery` either
    /// the room's own verdict or keyed by room).
    pub fn on_joined(&mut self, body: &Value) -> Verdicts {
        let mut out = Verdicts::default();
        let (Some(room), Some(pos)) = (
            body.get("roomId").and_then(Value::as_str),
            RoomPosition::from_json(body),
        ) else {
            return out;
        };
        let rec = body.get("recovery").map(|r| match r.get("recovered") {
            Some(_) => r,
            None => r.get(room).unwrap_or(&Value::Null),
        });
        self.settle(room, Some(pos), rec, &mut out);
        out
    }

    /// The server refused this connection's `since`: every pending room is
    /// to be resynced, and positions the server did not give on this
    /// connection are dropped.
    pub fn on_bad_since(&mut self) -> Verdicts {
        let resync = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|r| (r, "bad_since".to_string()))
            .collect();
        let confirmed = &self.confirmed;
        self.positions.retain(|r, _| confirmed.contains(r));
        Verdicts {
            recovered: Vec::new(),
            resync,
        }
    }

    /// A frame of `room` at `offset`: false when the client already has it
    /// (offset ≤ the last one), else the position moves to it.
    pub fn on_frame(&mut self, room: &str, offset: u64) -> bool {
        match self.positions.get_mut(room) {
            Some(p) if offset <= p.offset => return false,
            Some(p) => p.offset = offset,
            None => {
                self.positions.insert(
                    room.to_string(),
                    RoomPosition {
                        epoch: None,
                        offset,
                    },
                );
            }
        }
        self.known.insert(room.to_string());
        true
    }

    /// The client left `room`.
    pub fn forget(&mut self, room: &str) {
        self.positions.remove(room);
        self.known.remove(room);
        self.pending.remove(room);
        self.asked.remove(room);
        self.confirmed.remove(room);
    }

    /// Everything one server message means for the positions.
    pub fn observe(&mut self, msg: &Value, manual: &BTreeSet<String>) -> Seen {
        if let (Some(room), Some(offset)) = (
            msg.get("room").and_then(Value::as_str),
            msg.get("offset").and_then(Value::as_u64),
        ) && !self.on_frame(room, offset)
        {
            return Seen::Duplicate {
                room: room.to_string(),
                offset,
            };
        }
        if let Some(info) = connect_info(msg) {
            return Seen::Verdicts(self.on_connect(
                info.get("rooms"),
                info.get("recovery"),
                manual,
            ));
        }
        if msg.get("type").and_then(Value::as_str) == Some("room-joined") {
            return Seen::Verdicts(self.on_joined(crate::cache::body_of(msg)));
        }
        if is_bad_since(msg) {
            return Seen::Verdicts(self.on_bad_since());
        }
        Seen::Message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(e: &str, o: u64) -> RoomPosition {
        RoomPosition::new(e, o)
    }

    fn set(rooms: &[&str]) -> BTreeSet<String> {
        rooms.iter().map(|r| r.to_string()).collect()
    }

    fn since_of(p: &mut Positions, exclude: &[&str]) -> BTreeMap<String, RoomPosition> {
        decode_since(&p.begin(&set(exclude)).expect("a since")).expect("decodes")
    }

    fn resync(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn base64url_matches_rfc4648_without_padding() {
        // RFC 4648 §10 vectors, padding stripped; and the url-safe letters.
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
            ("?>?>~~", "Pz4_Pn5-"),
        ] {
            assert_eq!(base64url(plain.as_bytes()), enc);
            assert_eq!(from_base64url(enc).unwrap(), plain.as_bytes());
        }
        assert_eq!(from_base64url("Zm8=").unwrap(), b"fo");
        assert_eq!(from_base64url("Z"), None);
        assert_eq!(from_base64url("Zm+v"), None, "standard alphabet refused");
    }

    #[test]
    fn since_is_base64url_json_of_epoch_and_offset() {
        let mut m = BTreeMap::new();
        m.insert("admin-orders".to_string(), pos("e1", 42));
        m.insert("user-4".to_string(), pos("x/y+z", 0));
        m.insert(
            "no-epoch".to_string(),
            RoomPosition {
                epoch: None,
                offset: 3,
            },
        );
        let s = encode_since(&m).unwrap();
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(
            String::from_utf8(from_base64url(&s).unwrap()).unwrap(),
            r#"{"admin-orders":{"epoch":"e1","offset":42},"user-4":{"epoch":"x/y+z","offset":0}}"#
        );
        m.remove("no-epoch");
        assert_eq!(decode_since(&s).unwrap(), m);
        assert_eq!(encode_since(&BTreeMap::new()), None);
        let many: BTreeMap<String, RoomPosition> = (0..70)
            .map(|i| (format!("user-{i}"), pos("e", i)))
            .collect();
        assert_eq!(
            decode_since(&encode_since(&many).unwrap()).unwrap().len(),
            64
        );
        assert_eq!(decode_since("not json"), None);
    }

    #[test]
    fn positions_from_connect_and_frames_duplicates_dropped() {
        let mut p = Positions::default();
        assert_eq!(p.begin(&set(&[])), None, "nothing to resume at first");
        let v = p.on_connect(
            Some(&json!({"admin-orders": {"epoch": "E", "offset": 10}, "user-1": {"epoch": "U", "offset": 0}})),
            None,
            &set(&[]),
        );
        assert!(v.is_empty(), "a first connect resyncs nothing");
        assert!(p.on_frame("admin-orders", 11));
        assert!(p.on_frame("admin-orders", 12));
        assert!(!p.on_frame("admin-orders", 12));
        assert!(!p.on_frame("admin-orders", 3));
        let s = since_of(&mut p, &[]);
        assert_eq!(s["admin-orders"], pos("E", 12));
        assert_eq!(s["user-1"], pos("U", 0));
        // `observe` does the same from whole messages.
        let frame = json!({"type": "new-order", "data": {}, "room": "admin-orders", "offset": 12});
        assert_eq!(
            p.observe(&frame, &set(&[])),
            Seen::Duplicate {
                room: "admin-orders".into(),
                offset: 12
            }
        );
        let frame = json!({"type": "new-order", "data": {}, "room": "admin-orders", "offset": 13});
        assert_eq!(p.observe(&frame, &set(&[])), Seen::Message);
        assert_eq!(p.get("admin-orders"), Some(&pos("E", 13)));
    }

    #[test]
    fn recovered_rooms_keep_their_offset_others_resync() {
        let mut p = Positions::with([
            ("a".to_string(), pos("E", 7)),
            ("b".to_string(), pos("B", 3)),
            ("c".to_string(), pos("C", 1)),
        ]);
        assert_eq!(since_of(&mut p, &[]).len(), 3);
        let msg = json!({"type": "CONNECTED", "payload": {
            "rooms": {"a": {"epoch": "E", "offset": 10}, "b": {"epoch": "B2", "offset": 0},
                      "c": {"epoch": "C", "offset": 9}, "d": {"epoch": "D", "offset": 4}},
            "recovery": {"a": {"recovered": true, "missed": 3},
                         "b": {"recovered": false, "reason": "epoch_changed"},
                         "c": {"recovered": false, "reason": "too_old"}}}});
        let Seen::Verdicts(v) = p.observe(&msg, &set(&[])) else {
            panic!("verdicts")
        };
        assert_eq!(v.recovered, vec![("a".to_string(), 3)]);
        assert_eq!(
            v.resync,
            resync(&[("b", "epoch_changed"), ("c", "too_old")])
        );
        assert_eq!(p.get("a"), Some(&pos("E", 7)), "the replay moves it");
        assert!(p.on_frame("a", 8));
        assert_eq!(p.get("b"), Some(&pos("B2", 0)));
        assert_eq!(p.get("d"), Some(&pos("D", 4)));
    }

    #[test]
    fn no_verdict_or_no_position_resyncs() {
        let mut p = Positions::default();
        p.begin(&set(&[]));
        let rooms = json!({"a": {"epoch": "E", "offset": 1}, "b": {"epoch": "F", "offset": 1}});
        p.on_connect(Some(&rooms), None, &set(&[]));
        p.positions.get_mut("b").unwrap().epoch = None;
        assert_eq!(since_of(&mut p, &[]).keys().collect::<Vec<_>>(), ["a"]);
        let v = p.on_connect(Some(&rooms), None, &set(&[]));
        assert_eq!(
            v.resync,
            resync(&[("a", "not_recovered"), ("b", "no_position")])
        );
    }

    #[test]
    fn rooms_not_put_in_are_forgotten_hand_joined_wait_for_room_joined() {
        let mut p = Positions::with([
            ("gone".to_string(), pos("G", 1)),
            ("mine".to_string(), pos("M", 5)),
            ("a".to_string(), pos("E", 1)),
        ]);
        let s = since_of(&mut p, &["mine"]);
        assert_eq!(s.keys().collect::<Vec<_>>(), ["a", "gone"]);
        assert_eq!(
            p.since_for("mine"),
            Some(json!({"epoch": "M", "offset": 5}))
        );
        let v = p.on_connect(
            Some(&json!({"a": {"epoch": "E", "offset": 1}})),
            Some(&json!({"a": {"recovered": true, "missed": 0}})),
            &set(&["mine"]),
        );
        assert_eq!(v.recovered, vec![("a".to_string(), 0)]);
        assert!(v.resync.is_empty());
        assert_eq!(p.get("gone"), None);
        let joined = json!({"type": "room-joined", "data": {"roomId": "mine", "epoch": "M", "offset": 9,
            "recovery": {"recovered": true, "missed": 4}}});
        assert_eq!(
            p.observe(&joined, &set(&["mine"])),
            Seen::Verdicts(Verdicts {
                recovered: vec![("mine".into(), 4)],
                resync: vec![]
            })
        );
        assert_eq!(p.get("mine"), Some(&pos("M", 5)));
        p.begin(&set(&["mine"]));
        let v = p.on_joined(&json!({"roomId": "mine", "epoch": "M3", "offset": 0,
            "recovery": {"mine": {"recovered": false, "reason": "epoch_changed"}}}));
        assert_eq!(v.resync, resync(&[("mine", "epoch_changed")]));
        assert_eq!(p.get("mine"), Some(&pos("M3", 0)));
        assert!(
            p.on_joined(&json!({"roomId": "new", "epoch": "N", "offset": 2}))
                .is_empty()
        );
        assert_eq!(p.get("new"), Some(&pos("N", 2)));
        p.forget("new");
        assert_eq!(p.get("new"), None);
    }

    #[test]
    fn bad_since_resyncs_pending_rooms_once() {
        // Before the connect message.
        let mut p = Positions::with([
            ("a".to_string(), pos("E", 3)),
            ("b".to_string(), pos("F", 1)),
        ]);
        p.begin(&set(&[]));
        let err = json!({"type": "ERROR", "payload": {"code": "bad_since", "message": "x"}});
        assert_eq!(
            p.observe(&err, &set(&[])),
            Seen::Verdicts(Verdicts {
                recovered: vec![],
                resync: resync(&[("a", "bad_since"), ("b", "bad_since")])
            })
        );
        assert!(p.snapshot().is_empty());
        let rooms = json!({"a": {"epoch": "E", "offset": 5}});
        assert!(p.on_connect(Some(&rooms), None, &set(&[])).is_empty());
        assert_eq!(p.get("a"), Some(&pos("E", 5)));
        // After it: nothing twice, the server's positions kept.
        let mut p = Positions::with([("a".to_string(), pos("E", 3))]);
        p.begin(&set(&[]));
        assert_eq!(
            p.on_connect(Some(&rooms), None, &set(&[])).resync,
            resync(&[("a", "not_recovered")])
        );
        assert!(p.on_bad_since().is_empty());
        assert_eq!(p.get("a"), Some(&pos("E", 5)));
        // The three dialects' shapes.
        assert!(is_bad_since(
            &json!({"type": "error", "data": {"code": "bad_since"}})
        ));
        assert!(is_bad_since(&json!({"type": "error", "code": "bad_since"})));
        assert!(!is_bad_since(
            &json!({"type": "error", "code": "unauthorized"})
        ));
    }
}
