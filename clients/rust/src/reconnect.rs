//! A client that stays connected: exponential backoff with jitter between
//! attempts (at most `max_attempts`, 10 by default, as seed 000 says), no
//! retry after 4001/4003, application pings, and the caches of [`crate::cache`].
//!
//! One task owns the socket; it selects over the socket's inbound queue (a
//! cancel-safe mpsc receive: the frame reading itself happens in the
//! socket's reader task), outgoing messages, the ping timer and close.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::cache::{DriverPositions, OrdersCache};
use crate::{Incoming, Socket};

/// Close codes after which reconnecting cannot help.
pub const FATAL: [u16; 2] = [4001, 4003];

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub addr: SocketAddr,
    /// Endpoint path without the token, e.g. `/ws`.
    pub path: String,
    pub token: String,
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// `{"type":"ping"}` period; `None` = off.
    pub ping_every: Option<Duration>,
}

impl ClientConfig {
    pub fn new(addr: SocketAddr, path: &str, token: &str) -> ClientConfig {
        ClientConfig {
            addr,
            path: path.to_string(),
            token: token.to_string(),
            max_attempts: 10,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            ping_every: Some(Duration::from_secs(25)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    Connected,
    Message(Value),
    Disconnected(u16),
    Reconnecting {
        attempt: u32,
        delay: Duration,
    },
    /// No more attempts: a fatal close code, or `max_attempts` reached.
    GaveUp(u16),
}

/// The wait before attempt `n` (1-based): base·2^(n−1), capped, times a
/// jitter factor `j` in [0.5, 1.5).
pub fn backoff_delay(n: u32, base: Duration, max: Duration, j: f64) -> Duration {
    let raw = base
        .saturating_mul(2u32.saturating_pow(n.saturating_sub(1).min(20)))
        .min(max);
    raw.mul_f64(j.clamp(0.5, 1.5))
}

pub struct Client {
    events: mpsc::UnboundedReceiver<ClientEvent>,
    outgoing: mpsc::UnboundedSender<String>,
    pub orders: Arc<Mutex<OrdersCache>>,
    pub drivers: Arc<Mutex<DriverPositions>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    pub fn start(config: ClientConfig) -> Client {
        let (ev_tx, events) = mpsc::unbounded_channel();
        let (outgoing, out_rx) = mpsc::unbounded_channel();
        let orders = Arc::new(Mutex::new(OrdersCache::default()));
        let drivers = Arc::new(Mutex::new(DriverPositions::default()));
        let task = tokio::spawn(run(config, ev_tx, out_rx, orders.clone(), drivers.clone()));
        Client {
            events,
            outgoing,
            orders,
            drivers,
            task,
        }
    }

    /// The next event; `None` once the client gave up and all was read.
    pub async fn next_event(&mut self) -> Option<ClientEvent> {
        self.events.recv().await
    }

    /// Queues a text message (sent on the current or next connection).
    pub fn send(&self, text: impl Into<String>) {
        let _ = self.outgoing.send(text.into());
    }
}

async fn run(
    config: ClientConfig,
    events: mpsc::UnboundedSender<ClientEvent>,
    mut outgoing: mpsc::UnboundedReceiver<String>,
    orders: Arc<Mutex<OrdersCache>>,
    drivers: Arc<Mutex<DriverPositions>>,
) {
    let sep = if config.path.contains('?') { '&' } else { '?' };
    let path = format!("{}{sep}token={}", config.path, config.token);
    let mut attempt = 0u32;
    loop {
        let code = match Socket::connect(config.addr, &path, None, 1024).await {
            Err(_) => 1006,
            Ok(mut sock) => {
                attempt = 0;
                let _ = events.send(ClientEvent::Connected);
                let mut ping = config
                    .ping_every
                    .map(|p| tokio::time::interval_at(tokio::time::Instant::now() + p, p));
                let code = loop {
                    let tick = async {
                        match ping.as_mut() {
                            Some(p) => {
                                p.tick().await;
                            }
                            None => std::future::pending::<()>().await,
                        }
                    };
                    tokio::select! {
                        m = sock.recv() => match m {
                            Some(Incoming::Text(b)) => {
                                let Ok(v) = serde_json::from_slice::<Value>(&b) else { continue };
                                if v.get("type").and_then(Value::as_str) == Some("pong") {
                                    continue;
                                }
                                orders.lock().unwrap_or_else(|p| p.into_inner()).apply(&v);
                                drivers.lock().unwrap_or_else(|p| p.into_inner()).apply(&v);
                                let _ = events.send(ClientEvent::Message(v));
                            }
                            Some(Incoming::Close(c)) => break c,
                            None => break 1006,
                        },
                        o = outgoing.recv() => match o {
                            Some(text) => if sock.send_text(&text).await.is_err() { break 1006 },
                            None => return, // the Client was dropped
                        },
                        _ = tick => if sock.send_text(r#"{"type":"ping"}"#).await.is_err() { break 1006 },
                    }
                };
                let _ = events.send(ClientEvent::Disconnected(code));
                code
            }
        };
        if FATAL.contains(&code) || attempt >= config.max_attempts {
            let _ = events.send(ClientEvent::GaveUp(code));
            return;
        }
        attempt += 1;
        let j = rand::rng().random_range(0.5..1.5);
        let delay = backoff_delay(attempt, config.base_delay, config.max_delay, j);
        let _ = events.send(ClientEvent::Reconnecting { attempt, delay });
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let b = Duration::from_millis(100);
        let m = Duration::from_secs(1);
        assert_eq!(backoff_delay(1, b, m, 1.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(3, b, m, 1.0), Duration::from_millis(400));
        assert_eq!(backoff_delay(30, b, m, 1.0), m);
        assert_eq!(backoff_delay(1, b, m, 0.5), Duration::from_millis(50));
    }
}
