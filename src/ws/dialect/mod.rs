//! The three wire dialects: pure translations between socket bytes and typed
//! messages. No IO, no hub, broker, store or domain here.
//!
//! - [`Dialect::Rooms`] (`/`, seed 002): `{type, data}`, rooms joined by name.
//! - [`Dialect::Events`] (`/ws`, seed 000): `{type, payload}`, upper-case types.
//! - [`Dialect::Driver`] (`/ws/driver/orders/`, seed 001): `{type, ...fields}`.
//!
//! Each dialect renders an [`Event`] once per node (the caller caches the
//! bytes) and returns `None` for events it does not carry.

mod driver;
mod events;
mod rooms;

use serde_json::{Map, Value, json};

use crate::event::{Event, Position, Recovery, StreamPos};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    Rooms,
    Events,
    Driver,
}

pub const ALL: [Dialect; 3] = [Dialect::Rooms, Dialect::Events, Dialect::Driver];

/// What a client asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Ping,
    /// `since`: the position a resuming client has seen (rooms dialect,
    /// SPEC §10); `bad_since`: one was given but is malformed (the join
    /// goes on without recovery, with a `bad_since` error).
    JoinRoom {
        room: String,
        since: Option<StreamPos>,
        bad_since: bool,
    },
    LeaveRoom(String),
    Location(Position),
}

/// A message the client sent that cannot be acted on. The socket stays open
/// (except after a frame over the hard size cap, see `ws::conn`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtoError {
    #[error("malformed JSON: {0}")]
    BadJson(String),
    #[error("a message must be a JSON object with a string \"type\"")]
    NoType,
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("{0}")]
    BadField(String),
    #[error("binary frames are not supported; send JSON text")]
    Binary,
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

impl ProtoError {
    /// The error `code` clients see (snake_case, one catalogue: ARCHITECTURE.md).
    pub fn code(&self) -> &'static str {
        match self {
            ProtoError::BadJson(_) => "bad_json",
            ProtoError::NoType => "bad_message",
            ProtoError::UnknownType(_) => "unknown_type",
            ProtoError::BadField(_) => "bad_message",
            ProtoError::Binary => "binary_not_supported",
            ProtoError::TooLarge { .. } => "frame_too_large",
        }
    }
}

/// Server messages that are not events: connect messages, acks, errors.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply<'a> {
    Pong,
    /// Seed 002 `connected`; seed 000 `CONNECTED`; driver `connection_established`.
    /// `rooms`: the position of every room the socket was put in (empty
    /// when history is off); `recovery`: the outcome per room the client
    /// asked to resume (`since`), empty when it asked nothing.
    Connected {
        user_id: i64,
        role: &'a str,
        driver_id: i64,
        rooms: &'a [(String, StreamPos)],
        recovery: &'a [(String, Recovery)],
    },
    /// Driver `initial_orders` (other dialects send nothing).
    InitialOrders(&'a [Value]),
    /// The room's position (history on) and, when the join carried
    /// `since`, what the resume came to.
    RoomJoined {
        room: &'a str,
        pos: Option<&'a StreamPos>,
        recovery: Option<&'a Recovery>,
    },
    RoomLeft(&'a str),
    Error {
        code: &'a str,
        message: &'a str,
    },
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Rooms => "rooms",
            Dialect::Events => "events",
            Dialect::Driver => "driver",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// Parses one text message.
    pub fn parse(self, bytes: &[u8]) -> Result<Command, ProtoError> {
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| ProtoError::BadJson(e.to_string()))?;
        let obj = v.as_object().ok_or(ProtoError::NoType)?;
        let ty = obj
            .get("type")
            .and_then(Value::as_str)
            .ok_or(ProtoError::NoType)?;
        // The body of a message: `data` (rooms), `payload` (events), the
        // object itself (driver). Falls back to the top level so a client
        // that puts fields next to `type` is understood everywhere.
        let body_key = match self {
            Dialect::Rooms => Some("data"),
            Dialect::Events => Some("payload"),
            Dialect::Driver => None,
        };
        let body = body_key
            .and_then(|k| obj.get(k))
            .and_then(Value::as_object)
            .unwrap_or(obj);
        // `join-room`, `JOIN_ROOM` and `join_room` are one command.
        let norm = ty.to_ascii_lowercase().replace('_', "-");
        match norm.as_str() {
            "ping" => Ok(Command::Ping),
            "join-room" => {
                let room = room_id(body)?;
                let (since, bad_since) = match body.get("since") {
                    None | Some(Value::Null) => (None, false),
                    Some(v) => match serde_json::from_value::<StreamPos>(v.clone()) {
                        Ok(p) if p.epoch.len() <= 64 => (Some(p), false),
                        _ => (None, true),
                    },
                };
                Ok(Command::JoinRoom {
                    room,
                    since,
                    bad_since,
                })
            }
            "leave-room" => Ok(Command::LeaveRoom(room_id(body)?)),
            "location" => Ok(Command::Location(location(body)?)),
            _ => Err(ProtoError::UnknownType(ty.chars().take(64).collect())),
        }
    }

    /// Renders an event for a socket that receives it through a personal
    /// (`user-…`) room or not; `None` when this dialect does not carry it.
    pub fn render(self, event: &Event, personal: bool) -> Option<Vec<u8>> {
        self.render_at(event, personal, None)
    }

    /// [`Dialect::render`] for a historical event: the frame also carries
    /// top-level `"room"` and `"offset"` (SPEC §10), which seed clients
    /// ignore.
    pub fn render_at(
        self,
        event: &Event,
        personal: bool,
        at: Option<(&str, u64)>,
    ) -> Option<Vec<u8>> {
        let mut v = match self {
            Dialect::Rooms => rooms::render(&event.kind, personal),
            Dialect::Events => events::render(&event.kind),
            Dialect::Driver => driver::render(&event.kind),
        }?;
        if let (Some((room, offset)), Value::Object(m)) = (at, &mut v) {
            m.insert("room".into(), Value::String(room.to_string()));
            m.insert("offset".into(), Value::from(offset));
        }
        Some(serde_json::to_vec(&v).expect("a Value always serializes"))
    }

    pub fn reply(self, reply: &Reply<'_>) -> Vec<u8> {
        let v = match reply {
            Reply::Pong => json!({"type": "pong"}),
            Reply::RoomJoined {
                room,
                pos,
                recovery,
            } => {
                let mut body = json!({"roomId": room});
                if let Some(p) = pos {
                    body["epoch"] = json!(p.epoch);
                    body["offset"] = json!(p.offset);
                }
                if let Some(r) = recovery {
                    body["recovery"] = recovery_json(r);
                }
                self.wrap("room-joined", body)
            }
            Reply::RoomLeft(room) => self.wrap("room-left", json!({"roomId": room})),
            Reply::Error { code, message } => self.wrap(
                match self {
                    Dialect::Events => "ERROR",
                    _ => "error",
                },
                json!({"code": code, "message": message}),
            ),
            Reply::Connected {
                user_id,
                role,
                driver_id,
                rooms,
                recovery,
            } => {
                let mut v = match self {
                    Dialect::Rooms => {
                        json!({"type": "connected", "data": {"userId": user_id, "role": role}})
                    }
                    Dialect::Events => {
                        json!({"type": "CONNECTED", "payload": {"userId": user_id, "role": role}})
                    }
                    Dialect::Driver => json!({
                        "type": "connection_established",
                        "message": "Connected to driver orders",
                        "driver_id": driver_id,
                    }),
                };
                // Positions go beside the seed's fields: in `data`, in
                // `payload`, or top-level for the driver dialect.
                let body = match self {
                    Dialect::Rooms => &mut v["data"],
                    Dialect::Events => &mut v["payload"],
                    Dialect::Driver => &mut v,
                };
                if !rooms.is_empty() {
                    body["rooms"] = rooms
                        .iter()
                        .map(|(r, p)| (r.clone(), json!({"epoch": p.epoch, "offset": p.offset})))
                        .collect::<Map<String, Value>>()
                        .into();
                }
                if !recovery.is_empty() {
                    body["recovery"] = recovery
                        .iter()
                        .map(|(r, rec)| (r.clone(), recovery_json(rec)))
                        .collect::<Map<String, Value>>()
                        .into();
                }
                v
            }
            Reply::InitialOrders(orders) => json!({
                "type": "initial_orders",
                "orders": orders,
                "message": "Current pending orders",
            }),
        };
        serde_json::to_vec(&v).expect("a Value always serializes")
    }

    /// A message of `ty` with `body` in this dialect's shape.
    fn wrap(self, ty: &str, body: Value) -> Value {
        match self {
            Dialect::Rooms => json!({"type": ty, "data": body}),
            Dialect::Events => json!({"type": ty, "payload": body}),
            Dialect::Driver => flatten(ty, body),
        }
    }
}

fn recovery_json(r: &Recovery) -> Value {
    match r {
        Recovery::Recovered { missed } => json!({"recovered": true, "missed": missed}),
        Recovery::NotRecovered { reason } => json!({"recovered": false, "reason": reason}),
    }
}

/// `{type, ...body}`; `type` wins over a `type` field inside the body, and a
/// body that is not an object is kept under `data`.
pub(crate) fn flatten(ty: &str, body: Value) -> Value {
    let mut out = Map::new();
    out.insert("type".into(), Value::String(ty.to_string()));
    match body {
        Value::Object(m) => {
            for (k, v) in m {
                if k != "type" {
                    out.insert(k, v);
                }
            }
        }
        Value::Null => {}
        other => {
            out.insert("data".into(), other);
        }
    }
    Value::Object(out)
}

fn room_id(body: &Map<String, Value>) -> Result<String, ProtoError> {
    body.get("roomId")
        .or_else(|| body.get("room"))
        .and_then(Value::as_str)
        .map(String::from)
        .ok_or_else(|| ProtoError::BadField("roomId (string) is required".into()))
}

fn number(body: &Map<String, Value>, key: &str) -> Result<Option<f64>, ProtoError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => crate::event::number(v)
            .map(Some)
            .ok_or_else(|| ProtoError::BadField(format!("{key} must be a number"))),
    }
}

fn location(body: &Map<String, Value>) -> Result<Position, ProtoError> {
    let lat = number(body, "latitude")?
        .ok_or_else(|| ProtoError::BadField("latitude is required".into()))?;
    let lon = number(body, "longitude")?
        .ok_or_else(|| ProtoError::BadField("longitude is required".into()))?;
    Position::new(lat, lon, number(body, "heading")?, number(body, "speed")?)
        .map_err(|e| ProtoError::BadField(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_commands_in_each_shape() {
        assert_eq!(
            Dialect::Rooms.parse(br#"{"type":"ping"}"#),
            Ok(Command::Ping)
        );
        assert_eq!(
            Dialect::Rooms.parse(br#"{"type":"join-room","data":{"roomId":"admin-orders"}}"#),
            Ok(Command::JoinRoom {
                room: "admin-orders".into(),
                since: None,
                bad_since: false
            })
        );
        assert_eq!(
            Dialect::Events.parse(br#"{"type":"LEAVE_ROOM","payload":{"roomId":"x"}}"#),
            Ok(Command::LeaveRoom("x".into()))
        );
        assert_eq!(
            Dialect::Driver
                .parse(br#"{"type":"location","latitude":41.3,"longitude":"69.2","speed":3}"#),
            Ok(Command::Location(
                Position::new(41.3, 69.2, None, Some(3.0)).unwrap()
            ))
        );
    }

    #[test]
    fn parse_errors() {
        assert_eq!(Dialect::Rooms.parse(b"{").unwrap_err().code(), "bad_json");
        assert_eq!(
            Dialect::Rooms.parse(b"[1]").unwrap_err().code(),
            "bad_message"
        );
        assert_eq!(
            Dialect::Rooms
                .parse(br#"{"type":"dance"}"#)
                .unwrap_err()
                .code(),
            "unknown_type"
        );
        assert_eq!(
            Dialect::Rooms
                .parse(br#"{"type":"join-room","data":{}}"#)
                .unwrap_err()
                .code(),
            "bad_message"
        );
        assert_eq!(
            Dialect::Driver
                .parse(br#"{"type":"location","latitude":100,"longitude":1}"#)
                .unwrap_err()
                .code(),
            "bad_message"
        );
    }
}
