//! In-process broker for embedded single-node mode: a publish is delivered
//! straight to the local sink, room by room, in the publisher's task.

use std::sync::Arc;

use super::{Broker, BrokerError, Sink};
use crate::event::Event;
use crate::metrics as m;

pub struct MemoryBroker {
    sink: Arc<dyn Sink>,
}

impl MemoryBroker {
    pub fn new(sink: Arc<dyn Sink>) -> MemoryBroker {
        MemoryBroker { sink }
    }
}

impl Broker for MemoryBroker {
    async fn publish(&self, event: Arc<Event>) -> Result<(), BrokerError> {
        metrics::counter!(m::BROKER_PUBLISHED).increment(event.rooms.len() as u64);
        for room in &event.rooms {
            metrics::counter!(m::BROKER_RECEIVED).increment(1);
            self.sink.deliver(room, &event);
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
}
