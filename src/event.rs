//! The canonical, dialect-free description of what happened, and the rooms it
//! targets.
//!
//! Producers (HTTP API, dispatcher, offer clock, sync worker) build an
//! [`Event`]; the broker carries it between nodes as JSON (serialized once per
//! publish); each node renders it once per dialect. This module is a leaf: it
//! imports nothing else of the crate, and it never knows a wire format.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Room names, built in one place so producers and authorization agree.
pub mod room {
    pub const ADMIN: &str = "admin-orders";
    pub fn city(city_id: i64) -> String {
        format!("city-{city_id}-orders")
    }
    pub fn user(user_id: i64) -> String {
        format!("user-{user_id}")
    }
    pub fn driver(driver_id: i64) -> String {
        format!("driver-{driver_id}")
    }
    /// A room addressed to one person (its owner), as opposed to a staff room.
    /// Seed 002 tells the creator `order-created` but staff `new-order`.
    pub fn is_personal(room: &str) -> bool {
        room.starts_with("user-")
    }
    /// Room names are short words; anything else is refused before it reaches
    /// Redis (channel names are built from them).
    pub fn is_valid(room: &str) -> bool {
        !room.is_empty()
            && room.len() <= 128
            && room
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':' | b'.'))
    }
}

/// One event, addressed to an ordered list of rooms. A socket in several of
/// the rooms receives it once: on the first room of the list it is in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub rooms: Vec<String>,
    /// When the event was produced, microseconds since the Unix epoch; the
    /// end-to-end latency metric is measured from here.
    pub at_us: i64,
    pub kind: EventKind,
    /// Volatile events skip room history (SPEC §10): driver positions, and
    /// `/api/publish` with `"volatile": true`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub volatile: bool,
    /// A key that makes the event enter a room's history once, however often
    /// it is published (the event outbox retries with the same key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl Event {
    /// An event produced now; volatile when its kind always is
    /// (`DriverLocation`).
    pub fn new(rooms: Vec<String>, kind: EventKind) -> Event {
        Event {
            rooms,
            at_us: now_us(),
            volatile: matches!(kind, EventKind::DriverLocation { .. }),
            kind,
            id: None,
        }
    }

    /// Index of `room` in the event's room list.
    pub fn room_index(&self, room: &str) -> Option<usize> {
        self.rooms.iter().position(|r| r == room)
    }
}

/// Where a room's history stands (SPEC §10): `epoch` changes whenever the
/// history was lost or reset; `offset` is that of the room's last
/// historical event (0 before the first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPos {
    pub epoch: String,
    pub offset: u64,
}

/// An epoch as a number, for comparing cheaply (every epoch is 16 hex
/// digits, see `broker::new_epoch`; anything else is 0).
pub fn epoch_id(epoch: &str) -> u64 {
    u64::from_str_radix(epoch, 16).unwrap_or(0)
}

/// What a resume of one room came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Every event after the client's offset was replayed (`missed` of them).
    Recovered { missed: u64 },
    /// Nothing was replayed: `epoch_changed` or `too_old`.
    NotRecovered { reason: &'static str },
}

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// ISO 8601 UTC with milliseconds, as the seeds print timestamps.
pub fn iso_now() -> String {
    iso(&chrono::Utc::now())
}

/// `t` as RFC 3339 UTC with milliseconds (`2026-11-30T10:00:00.000Z`): the
/// one timestamp format of every dialect and the HTTP API.
pub fn iso(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// An amount of money in cents as the JSON number every dialect and the
/// HTTP API show (SPEC §5): whole amounts without a fraction (`1500`, not
/// `1500.0`), others with their cents (`12.5`, `0.05`).
pub fn money(cents: i64) -> Value {
    if cents % 100 == 0 {
        Value::from(cents / 100)
    } else {
        Value::from(cents as f64 / 100.0)
    }
}

/// Cents as a (nearest) double, for the events that carry amounts as numbers.
pub fn cents_f64(cents: i64) -> f64 {
    cents as f64 / 100.0
}

/// A number given as a JSON number or a decimal string (seed 001 sends
/// coordinates as strings); `None` when it is neither, or not finite.
pub fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|f| f.is_finite())
}

/// Whether a latitude/longitude pair is one Redis GEO can index (latitudes
/// beyond ±85.05 are outside its projection).
pub fn valid_point(latitude: f64, longitude: f64) -> bool {
    (-85.05..=85.05).contains(&latitude) && (-180.0..=180.0).contains(&longitude)
}

/// Great-circle distance in km (the same formula Redis GEO uses).
pub fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    const R: f64 = 6372.797560856;
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * R * a.sqrt().asin()
}

/// A driver's reported position, validated once wherever it arrives (socket,
/// HTTP): coordinates in range, heading and speed finite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Position {
    latitude: f64,
    longitude: f64,
    heading: Option<f64>,
    speed: Option<f64>,
}

/// Why a position was refused; the message is the client's error text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PositionError {
    #[error("latitude must be within ±85.05 and longitude within ±180")]
    OutOfRange,
    #[error("heading and speed must be finite numbers")]
    NotFinite,
}

impl Position {
    pub fn new(
        latitude: f64,
        longitude: f64,
        heading: Option<f64>,
        speed: Option<f64>,
    ) -> Result<Position, PositionError> {
        if !(latitude.is_finite() && longitude.is_finite() && valid_point(latitude, longitude)) {
            return Err(PositionError::OutOfRange);
        }
        if heading.is_some_and(|h| !h.is_finite()) || speed.is_some_and(|s| !s.is_finite()) {
            return Err(PositionError::NotFinite);
        }
        Ok(Position {
            latitude,
            longitude,
            heading,
            speed,
        })
    }
    pub fn latitude(&self) -> f64 {
        self.latitude
    }
    pub fn longitude(&self) -> f64 {
        self.longitude
    }
    pub fn heading(&self) -> Option<f64> {
        self.heading
    }
    pub fn speed(&self) -> Option<f64> {
        self.speed
    }
}

/// Everything switchboard tells clients about. Orders travel as the JSON
/// object of SPEC §4 (built by the domain layer), so this module stays free of
/// the database model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum EventKind {
    /// `POST /api/publish`: a backend's own message, rendered with its `type`
    /// unchanged.
    Custom {
        ty: String,
        data: Value,
    },
    OrderCreated {
        order: Value,
    },
    /// The order after the change, the fields that changed, and the status
    /// before it when the status changed.
    OrderUpdated {
        order: Value,
        changed: Vec<String>,
        old_status: Option<String>,
        timestamp: String,
    },
    OrderDeleted {
        id: i64,
    },
    /// An offer to a driver: the order JSON with `distance_to_pickup_km`.
    OfferMade {
        order: Value,
    },
    /// An offer that ended without acceptance (expired, passed on, cancelled).
    OfferEnded {
        order_id: i64,
        message: String,
    },
    DriverLocation {
        driver_id: i64,
        latitude: f64,
        longitude: f64,
        heading: Option<f64>,
        speed: Option<f64>,
        timestamp: String,
    },
    BonusUpdated {
        balance: f64,
        /// `earned`, `used` or `refunded`.
        operation: String,
        amount: f64,
        order_id: Option<i64>,
        timestamp: String,
    },
    Sync {
        ok: bool,
        entity: String,
        entity_id: i64,
        error: Option<String>,
        timestamp: String,
    },
}

impl EventKind {
    /// A bounded name for metrics labels (never the free-form custom type).
    pub fn metric_name(&self) -> &'static str {
        match self {
            EventKind::Custom { .. } => "custom",
            EventKind::OrderCreated { .. } => "order_created",
            EventKind::OrderUpdated { .. } => "order_updated",
            EventKind::OrderDeleted { .. } => "order_deleted",
            EventKind::OfferMade { .. } => "offer_made",
            EventKind::OfferEnded { .. } => "offer_ended",
            EventKind::DriverLocation { .. } => "driver_location",
            EventKind::BonusUpdated { .. } => "bonus_updated",
            EventKind::Sync { .. } => "sync",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let e = Event::new(
            vec![room::ADMIN.into(), room::user(4)],
            EventKind::Custom {
                ty: "hello".into(),
                data: serde_json::json!({"a": 1}),
            },
        );
        let bytes = serde_json::to_vec(&e).unwrap();
        let back: Event = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.room_index("user-4"), Some(1));
    }

    #[test]
    fn money_renders_without_trailing_zeros() {
        let text = |c| money(c).to_string();
        assert_eq!(text(150_000), "1500");
        assert_eq!(text(7_500), "75");
        assert_eq!(text(1_250), "12.5");
        assert_eq!(text(5), "0.05");
        assert_eq!(text(0), "0");
        assert_eq!(text(123_456_789), "1234567.89");
        assert_eq!(text(100_000_000_000), "1000000000");
        assert_eq!(text(99_999_999_999), "999999999.99");
    }

    #[test]
    fn room_names() {
        assert!(room::is_valid("city-3-orders"));
        assert!(!room::is_valid("a b"));
        assert!(!room::is_valid(""));
        assert!(!room::is_valid(&"x".repeat(129)));
        assert!(room::is_personal("user-1"));
        assert!(!room::is_personal("admin-orders"));
    }
}
