//! The rules layer's shared ground: [`Ctx`], the narrow context every rule
//! takes (database, broker, driver index, offer clock and the settings the
//! rules read), and [`DomainError`], the one error type of the rules, which
//! the edges map to HTTP statuses (`http`) and dialect errors (`ws`).
//!
//! - [`model`]: pure order rules (lifecycle, visibility, the order JSON,
//!   the rooms that hear about an order), used by `dispatch` too.
//! - [`orders`], [`bonuses`], [`sync`]: the services. `orders` calls the
//!   dispatcher; the dispatcher uses only this module and `model`, never
//!   the services, so the rules layer has no cycle.
//! - [`relay`]: publishes the event outbox. A change's events are written
//!   in the change's transaction (`store`); after the commit the rule calls
//!   [`Ctx::wake_relay`]. Only events that record no change (driver
//!   positions, `/api/publish`, sync results) go out by [`Ctx::publish`].

pub mod bonuses;
pub mod dispatch;
pub mod model;
pub mod orders;
pub mod relay;
pub mod sync;

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio::sync::Notify;

use crate::broker::{AnyBroker, Broker, BrokerError};
use crate::clock::{AnyClock, ClockError};
use crate::config::Config;
use crate::event::Event;
use crate::index::{AnyIndex, IndexError};
use crate::store::StoreError;

/// What the rules read from the configuration, and nothing else.
#[derive(Debug, Clone)]
pub struct Rules {
    pub offer_timeout: Duration,
    pub offer_lease: Duration,
    pub dispatch_radius_km: f64,
    pub driver_stale: Duration,
    pub dispatch_cooldown: Duration,
    pub dispatch_retry: Duration,
    pub dispatch_give_up: Duration,
    pub bonus_rate: f64,
    /// `SWITCHBOARD_FAULT=hang-after-claim` (tests only).
    pub fault_hang_after_claim: bool,
    /// `None` when `SYNC_URL` is unset: no sync jobs are written.
    pub sync: Option<SyncRules>,
}

/// The sync outbox's settings (`SYNC_*`).
#[derive(Debug, Clone)]
pub struct SyncRules {
    pub url: String,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub backoff: Duration,
}

impl Rules {
    pub fn from_config(c: &Config) -> Rules {
        Rules {
            offer_timeout: c.offer_timeout,
            offer_lease: c.offer_lease,
            dispatch_radius_km: c.dispatch_radius_km,
            driver_stale: c.driver_stale,
            dispatch_cooldown: c.dispatch_cooldown,
            dispatch_retry: c.dispatch_retry,
            dispatch_give_up: c.dispatch_give_up,
            bonus_rate: c.bonus_rate,
            fault_hang_after_claim: c.fault_hang_after_claim,
            sync: c.sync_url.clone().map(|url| SyncRules {
                url,
                timeout: c.sync_timeout,
                max_attempts: c.sync_max_attempts,
                backoff: c.sync_backoff,
            }),
        }
    }
}

/// The handles the rules use. One per node, shared (`Arc`) by the edges and
/// the background loops (offer clock, sync worker).
pub struct Ctx {
    pub db: DatabaseConnection,
    pub broker: AnyBroker,
    pub drivers: AnyIndex,
    pub offers: AnyClock,
    pub rules: Rules,
    /// Wakes this node's event relay after a commit wrote outbox rows.
    pub relay: Notify,
    /// When this node last re-dispatched each waiting order because a
    /// driver became eligible near it (at most one such try per order per
    /// [`dispatch::ELIGIBLE_GAP`]).
    pub(crate) eligible_tries: std::sync::Mutex<std::collections::HashMap<i64, std::time::Instant>>,
}

impl Ctx {
    /// Whether order changes are written to the sync outbox (`SYNC_URL` set).
    pub fn sync_on(&self) -> bool {
        self.rules.sync.is_some()
    }

    /// Tells this node's relay that outbox rows were committed, so they go
    /// out within milliseconds instead of at its next poll.
    pub fn wake_relay(&self) {
        self.relay.notify_one();
    }

    /// Publishes an event that records no change (driver positions, custom
    /// events, sync results) to its rooms on every node, now. Events of
    /// committed changes go through the outbox instead (see [`relay`]).
    pub async fn publish(&self, event: Event) -> Result<(), DomainError> {
        Ok(self.broker.publish(Arc::new(event)).await?)
    }
}

/// Every way a rule can fail. The edges choose the status or close code;
/// [`DomainError::code`] is the snake_case code both show.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// The request itself is malformed (400).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The state does not allow it (409).
    #[error("{0}")]
    Conflict(String),
    /// A business rule was broken (422), with its own code.
    #[error("{message}")]
    Rule { code: &'static str, message: String },
    #[error("database: {0}")]
    Store(StoreError),
    #[error("{0}")]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    Index(#[from] IndexError),
    #[error("{0}")]
    Clock(#[from] ClockError),
}

impl From<StoreError> for DomainError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InsufficientBonuses { .. } => DomainError::Rule {
                code: "insufficient_bonuses",
                message: e.to_string(),
            },
            StoreError::OrderNumberTaken(_) => DomainError::Conflict(e.to_string()),
            e => DomainError::Store(e),
        }
    }
}

impl DomainError {
    /// A backend is out of reach (503), as opposed to a rule saying no or
    /// an internal failure.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DomainError::Store(e) => e.is_unavailable(),
            DomainError::Broker(_) | DomainError::Index(_) | DomainError::Clock(_) => true,
            _ => false,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            DomainError::Invalid(_) => "bad_request",
            DomainError::NotFound(_) => "not_found",
            DomainError::Conflict(_) => "conflict",
            DomainError::Rule { code, .. } => code,
            e if e.is_unavailable() => "unavailable",
            _ => "internal",
        }
    }
}
