//! In-process broker for embedded single-node mode: a publish is delivered
//! straight to the local sink, room by room, in the publisher's task.
//!
//! History lives in a map of rooms behind one mutex. A historical event is
//! appended and delivered under that mutex, so per room the offsets reach
//! sockets in order (two publishers never interleave inside a room), and a
//! replay reading the history sees exactly what was delivered. Delivery never
//! waits (the hub only queues and writes without blocking), so holding the
//! lock across it is short.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Broker, BrokerError, Replay, Sink, judge, new_epoch};
use crate::config::HistoryConfig;
use crate::event::{Event, StreamPos};
use crate::lock::lock;
use crate::metrics as m;

/// One room's history.
struct RoomLog {
    epoch: String,
    /// Offset of the last event appended (0 before the first).
    offset: u64,
    events: VecDeque<(u64, Arc<Event>)>,
    touched: Instant,
}

impl RoomLog {
    fn new() -> RoomLog {
        RoomLog {
            epoch: new_epoch(),
            offset: 0,
            events: VecDeque::new(),
            touched: Instant::now(),
        }
    }

    fn pos(&self) -> StreamPos {
        StreamPos {
            epoch: self.epoch.clone(),
            offset: self.offset,
        }
    }
}

struct Logs {
    rooms: HashMap<String, RoomLog>,
    last_sweep: Instant,
}

pub struct MemoryBroker {
    sink: Arc<dyn Sink>,
    history: HistoryConfig,
    logs: Mutex<Logs>,
}

impl MemoryBroker {
    pub fn new(sink: Arc<dyn Sink>, history: HistoryConfig) -> MemoryBroker {
        MemoryBroker {
            sink,
            history,
            logs: Mutex::new(Logs {
                rooms: HashMap::new(),
                last_sweep: Instant::now(),
            }),
        }
    }

    /// The room's log, started afresh (new epoch) when it expired.
    fn log<'a>(&self, logs: &'a mut Logs, room: &str) -> &'a mut RoomLog {
        let ttl = self.history.ttl;
        let log = logs
            .rooms
            .entry(room.to_string())
            .or_insert_with(RoomLog::new);
        if log.touched.elapsed() > ttl {
            *log = RoomLog::new();
        }
        log
    }

    /// Drops expired rooms now and then, so rooms nobody publishes to any
    /// more do not keep memory.
    fn sweep(&self, logs: &mut Logs) {
        if logs.last_sweep.elapsed() < Duration::from_secs(10) {
            return;
        }
        logs.last_sweep = Instant::now();
        let ttl = self.history.ttl;
        logs.rooms.retain(|_, l| l.touched.elapsed() <= ttl);
    }
}

impl Broker for MemoryBroker {
    async fn publish(&self, event: Arc<Event>) -> Result<(), BrokerError> {
        metrics::counter!(m::BROKER_PUBLISHED).increment(event.rooms.len() as u64);
        let historical = self.history.enabled() && !event.volatile;
        for room in &event.rooms {
            metrics::counter!(m::BROKER_RECEIVED).increment(1);
            if !historical {
                self.sink.deliver(room, None, &event);
                continue;
            }
            let mut logs = lock(&self.logs);
            self.sweep(&mut logs);
            let size = self.history.size;
            let log = self.log(&mut logs, room);
            // Once into history, whatever the retries (the event outbox
            // republishes with the same id).
            if event.id.is_some() && log.events.iter().any(|(_, e)| e.id == event.id) {
                metrics::counter!(m::HISTORY_DUPLICATES).increment(1);
                continue;
            }
            log.offset += 1;
            log.touched = Instant::now();
            log.events.push_back((log.offset, event.clone()));
            while log.events.len() > size {
                log.events.pop_front();
            }
            let offset = log.offset;
            // Delivered under the lock: see the module doc.
            self.sink.deliver(room, Some(offset), &event);
        }
        Ok(())
    }

    async fn reconcile(&self, _room: &str) -> Result<(), BrokerError> {
        // Every local room is "subscribed": delivery asks the sink directly.
        Ok(())
    }

    fn is_healthy(&self) -> bool {
        true
    }

    async fn position(&self, room: &str) -> Result<Option<StreamPos>, BrokerError> {
        if !self.history.enabled() {
            return Ok(None);
        }
        let mut logs = lock(&self.logs);
        let log = self.log(&mut logs, room);
        Ok(Some(log.pos()))
    }

    async fn replay(&self, room: &str, since: &StreamPos) -> Result<Option<Replay>, BrokerError> {
        if !self.history.enabled() {
            return Ok(None);
        }
        let mut logs = lock(&self.logs);
        let log = self.log(&mut logs, room);
        let events: Vec<(u64, Event)> = log
            .events
            .iter()
            .filter(|(o, _)| *o > since.offset)
            .map(|(o, e)| (*o, (**e).clone()))
            .collect();
        Ok(Some(judge(since, log.pos(), events)))
    }
}
