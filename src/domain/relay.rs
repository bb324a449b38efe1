//! The event relay: publishes the event outbox through the broker.
//!
//! Every change that tells clients about itself writes its events into the
//! outbox in its own transaction (`store`), so a committed change is never
//! lost on the way to Redis. Every node runs [`Relay::run`]:
//!
//! - **One drainer at a time.** A relay drains only while it holds the
//!   `event-relay` lease (`store::take_lease`, one conditional upsert), so
//!   in the whole cluster rows are published by one relay at a time, in id
//!   order: per room, events reach the broker in commit order. The drainer
//!   renews the lease every second ([`RENEW_EVERY`]) and gives it back in
//!   the transaction that deletes the last batch, so the next commit on any
//!   node drains at once. A node that dies mid-drain keeps the lease until
//!   it runs out ([`LEASE`]); then any node takes over.
//! - **In order, retried.** Rows are published one by one, each publish
//!   awaited before the next. A failed publish (Redis down) is retried, same
//!   row first, with backoff from 50 ms doubling to 2 s, keeping the lease.
//! - **At least once into the broker, once into history.** A row is deleted
//!   after its publish; a relay that dies in between leaves it for the next
//!   drainer, which publishes it again with the same [`Event::id`]
//!   (`outbox-{row id}`), the key the broker uses to put an event into a
//!   room's history once.
//! - **Wake-ups.** A commit on this node wakes its relay
//!   ([`Ctx::wake_relay`]): a few milliseconds from commit to broker. Every
//!   relay also looks at the outbox every second (rows a dead node left, rows
//!   committed while another relay held the lease), and retries soon after
//!   finding the lease taken.
//!
//! On PostgreSQL a transaction may commit after one with a larger row id;
//! its rows are published when they become visible (rows are deleted by id,
//! never by range), i.e. still in commit order. A change made after another
//! was committed always has larger ids.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Ctx;
use crate::broker::{Broker, BrokerError};
use crate::event::Event;
use crate::metrics as m;
use crate::store::{self, OutboxRow, RELAY_LEASE, StoreError};

/// How long the lease outlives its last renewal: how soon a dead drainer is
/// taken over. Renewed every [`RENEW_EVERY`], also while a publish waits.
pub const LEASE: Duration = Duration::from_secs(5);
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How often an idle relay looks at the outbox (and refreshes the gauge).
const POLL: Duration = Duration::from_secs(1);
/// Rows read per query.
const BATCH: u64 = 256;
/// After finding the lease taken: the first retry (doubling up to POLL).
const BUSY_RETRY: Duration = Duration::from_millis(20);
/// After a failed publish or query: the first retry, doubling up to the max.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// One node's relay.
pub struct Relay {
    /// This relay's name in the lease: the node id and a random tag (two
    /// nodes may share a `NODE_ID`).
    holder: String,
    /// `SWITCHBOARD_FAULT=hang-after-publish` (tests only): stop after the
    /// first batch is published, before its rows are deleted, as if the
    /// node died there.
    hang_after_publish: bool,
}

enum Drained {
    /// The outbox was empty when this relay looked (last).
    Empty,
    /// Another relay holds the lease.
    Busy,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("publish: {0}")]
    Broker(#[from] BrokerError),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// A renewal found the lease taken over: this relay stopped draining.
    #[error("lease taken over while draining")]
    LeaseLost,
}

impl RelayError {
    fn op(&self) -> &'static str {
        match self {
            RelayError::Broker(_) => "publish",
            RelayError::Store(_) => "store",
            RelayError::LeaseLost => "lease",
        }
    }
}

/// The lease while this relay drains: when it was last renewed.
struct Held {
    renewed: Instant,
}

impl Relay {
    pub fn new(node_id: &str, hang_after_publish: bool) -> Relay {
        let tag: u32 = rand::random();
        Relay {
            holder: format!("{node_id}/{tag:08x}"),
            hang_after_publish,
        }
    }

    /// The relay loop, until `stop`: drains at start, then whenever woken,
    /// every [`POLL`], or on its retry schedule.
    pub async fn run(self, ctx: Arc<Ctx>, stop: CancellationToken) {
        metrics::counter!(m::OUTBOX_RELAYED).increment(0);
        for op in ["publish", "store", "lease"] {
            metrics::counter!(m::OUTBOX_RELAY_ERRORS, "op" => op).increment(0);
        }
        let mut wait = Duration::ZERO;
        let mut busy = BUSY_RETRY;
        let mut backoff = BACKOFF_FIRST;
        let mut failing = false;
        let mut gauge_at: Option<Instant> = None;
        loop {
            // While failing, commits do not cut the backoff short.
            tokio::select! {
                _ = ctx.relay.notified(), if !failing => busy = BUSY_RETRY,
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => break,
            }
            if gauge_at.is_none_or(|t| t.elapsed() >= POLL) {
                gauge_at = Some(Instant::now());
                if let Ok(n) = store::count_outbox(&ctx.db).await {
                    metrics::gauge!(m::OUTBOX_PENDING).set(n as f64);
                }
            }
            wait = match self.drain(&ctx).await {
                Ok(outcome) => {
                    failing = false;
                    backoff = BACKOFF_FIRST;
                    match outcome {
                        Drained::Empty => POLL,
                        // Another relay drains; it may have looked before
                        // this node's rows committed, so look again soon.
                        Drained::Busy => {
                            let w = busy;
                            busy = (busy * 2).min(POLL);
                            w
                        }
                    }
                }
                Err(e) => {
                    metrics::counter!(m::OUTBOX_RELAY_ERRORS, "op" => e.op()).increment(1);
                    if failing {
                        tracing::debug!(error = %e, "event relay still failing; retry in {backoff:?}");
                    } else {
                        tracing::warn!(error = %e, "event relay failed; retrying in {backoff:?}, in order");
                    }
                    failing = true;
                    let w = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    w
                }
            };
        }
        // A relay stopped while retrying gives the lease back at once.
        let _ = store::release_lease(&ctx.db, RELAY_LEASE, &self.holder).await;
    }

    /// Publishes the outbox until it is empty, if this relay gets the lease.
    async fn drain(&self, ctx: &Ctx) -> Result<Drained, RelayError> {
        // An idle look costs one read, not a lease write.
        if store::outbox_batch(&ctx.db, 1).await?.is_empty() {
            return Ok(Drained::Empty);
        }
        if !store::take_lease(&ctx.db, RELAY_LEASE, &self.holder, LEASE).await? {
            return Ok(Drained::Busy);
        }
        let mut lease = Held {
            renewed: Instant::now(),
        };
        loop {
            let rows = store::outbox_batch(&ctx.db, BATCH).await?;
            let last = (rows.len() as u64) < BATCH;
            let mut done = Vec::with_capacity(rows.len());
            for row in &rows {
                if let Err(e) = self.publish(ctx, &mut lease, row).await {
                    // What went out is not sent again; the lease stays ours
                    // for the retry, which starts with this row.
                    let _ = store::delete_outbox(&ctx.db, &done, None).await;
                    metrics::counter!(m::OUTBOX_RELAYED).increment(done.len() as u64);
                    return Err(e);
                }
                done.push(row.id);
            }
            if self.hang_after_publish && !done.is_empty() {
                tracing::error!(rows = ?done, "fault injection: hanging after publish");
                std::future::pending::<()>().await;
            }
            // The last batch gives the lease back in the same transaction.
            store::delete_outbox(&ctx.db, &done, last.then_some(self.holder.as_str())).await?;
            metrics::counter!(m::OUTBOX_RELAYED).increment(done.len() as u64);
            if last {
                return Ok(Drained::Empty);
            }
            if lease.renewed.elapsed() >= RENEW_EVERY {
                lease.renew(ctx, &self.holder).await?;
            }
        }
    }

    /// Publishes one row's event with its history key, renewing the lease
    /// while the broker takes its time.
    async fn publish(
        &self,
        ctx: &Ctx,
        lease: &mut Held,
        row: &OutboxRow,
    ) -> Result<(), RelayError> {
        let mut event: Event = match serde_json::from_str(&row.event) {
            Ok(e) => e,
            Err(e) => {
                // Cannot happen for rows this version wrote; skipping keeps
                // one bad row from blocking every event behind it.
                tracing::error!(row = row.id, error = %e, "undecodable outbox row dropped");
                return Ok(());
            }
        };
        event.id = Some(format!("outbox-{}", row.id));
        let publish = ctx.broker.publish(Arc::new(event));
        tokio::pin!(publish);
        loop {
            let renew_in = RENEW_EVERY.saturating_sub(lease.renewed.elapsed());
            tokio::select! {
                r = &mut publish => return Ok(r?),
                _ = tokio::time::sleep(renew_in) => lease.renew(ctx, &self.holder).await?,
            }
        }
    }
}

impl Held {
    async fn renew(&mut self, ctx: &Ctx, holder: &str) -> Result<(), RelayError> {
        if store::take_lease(&ctx.db, RELAY_LEASE, holder, LEASE).await? {
            self.renewed = Instant::now();
            Ok(())
        } else {
            Err(RelayError::LeaseLost)
        }
    }
}
