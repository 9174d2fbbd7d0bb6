//! The node's event stream for local clients: `GET /v1/events` (server-sent events).
//!
//! Generic over what happens: anything in the daemon publishes an [`ApiEvent`] of a
//! kind (a short fixed word) with a JSON body, and every subscriber of the bus gets
//! it, in order, numbered. Kinds today, with their `data`:
//!
//! | kind | data |
//! |---|---|
//! | `presence` | a contact came online, changed endpoints or went offline: the contact as in `GET /v1/contacts` |
//! | `role` | `{"supernode": bool}`: this node was promoted or demoted |
//! | `homes` | `{"homes": [peer keys]}`: the home supernodes changed |
//! | `reflexive` | `{"addr"}`: the supernodes see this node at a new address |
//! | `handle_refused` | `{"handle"}`: another live user holds the configured handle |
//! | `contact_added`, `contact_removed` | the contact |
//! | `session_up` | `{"peer", "addr"}` |
//! | `session_down` | `{"peer", "reason"}` |
//! | `call_incoming` | `{"call", "from", "fingerprint", "handle"}`: a verified caller; answer with `POST /v1/calls/{call}/answer` |
//! | `call_ringing` | `{"call"}`: the callee's phone rings |
//! | `call_connected` | `{"call", "path"}`: media flows (`path`: direct, relay1 or relay2) |
//! | `call_path_switched` | `{"call", "from", "to"}`: the active path changed |
//! | `call_ended` | `{"call", "outcome", "reason", "stats"}`: outcome as in `peercall_calls_total`, the reason in words, the call as `GET /v1/calls/{id}` shows it |
//!
//! A subscriber that falls more than [`EVENT_BUFFER`] events behind misses the
//! oldest and is told so with a `lagged` event (`{"missed": n}`): a slow client
//! never holds the node back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::sync::broadcast;

/// Events kept for each subscriber that has not read them yet: presence changes
/// and role changes come seconds apart, so this absorbs a burst of hundreds
/// (contacts coming online after a restart) for a client reading late.
pub const EVENT_BUFFER: usize = 1024;

/// One event.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ApiEvent {
    /// Its number, from 1, in publishing order.
    pub id: u64,
    /// What kind (the SSE `event:` field).
    pub kind: &'static str,
    /// Its body (the SSE `data:` field, as JSON).
    pub data: serde_json::Value,
}

/// Fans events out to the subscribers.
#[derive(Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<ApiEvent>>,
    next: AtomicU64,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new()
    }
}

impl EventBus {
    /// A bus with no subscribers.
    pub fn new() -> EventBus {
        let (tx, _) = broadcast::channel(EVENT_BUFFER);
        EventBus {
            tx,
            next: AtomicU64::new(1),
        }
    }

    /// Publishes an event of `kind` with `data`; nothing happens without
    /// subscribers (the number is used anyway, so gaps are harmless).
    pub fn publish(&self, kind: &'static str, data: impl Serialize) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if self.tx.receiver_count() == 0 {
            return;
        }
        let data = match serde_json::to_value(data) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(kind, error = %e, "event body does not serialize");
                return;
            }
        };
        // Fails only without receivers, which is fine.
        let _ = self.tx.send(Arc::new(ApiEvent { id, kind, data }));
    }

    /// A new subscription: every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ApiEvent>> {
        self.tx.subscribe()
    }

    /// Subscribers now.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::broadcast::error::TryRecvError;

    #[test]
    fn subscribers_get_every_event_in_order_and_laggards_are_told() {
        let bus = EventBus::new();
        bus.publish("nobody", 1);
        let mut a = bus.subscribe();
        assert_eq!(bus.subscribers(), 1);
        bus.publish("role", serde_json::json!({"supernode": true}));
        bus.publish("homes", serde_json::json!({"homes": []}));
        let first = a.try_recv().unwrap();
        assert_eq!((first.id, first.kind), (2, "role"));
        assert_eq!(first.data["supernode"], true);
        assert_eq!(a.try_recv().unwrap().kind, "homes");
        assert!(matches!(a.try_recv(), Err(TryRecvError::Empty)));
        for i in 0..EVENT_BUFFER + 5 {
            bus.publish("x", i);
        }
        assert!(matches!(a.try_recv(), Err(TryRecvError::Lagged(5))));
        assert_eq!(a.try_recv().unwrap().data, 5);
    }
}
