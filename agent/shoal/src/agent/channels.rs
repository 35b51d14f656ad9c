//! Named bounded channels with a depth gauge each (corrosion's
//! `bounded(cap, "name")`): every queue between the agent's tasks has a size from
//! the `[perf]` config and shows up in `/metrics` as `shoal_channel_depth{name}`,
//! so a backed-up owner is visible before it is a problem.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

type Depth = Box<dyn Fn() -> usize + Send + Sync>;

/// One registered channel: its name, capacity and how to measure its depth.
struct Gauge {
    name: &'static str,
    capacity: usize,
    depth: Depth,
}

/// The registry of the agent's channels.
#[derive(Clone, Default)]
pub struct Channels {
    gauges: Arc<Mutex<Vec<Gauge>>>,
}

impl Channels {
    /// A bounded channel called `name` holding at most `capacity` (at least 1)
    /// messages.
    pub fn bounded<T: Send + 'static>(
        &self,
        name: &'static str,
        capacity: usize,
    ) -> (mpsc::Sender<T>, mpsc::Receiver<T>) {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        // A weak sender measures without keeping the channel open.
        let weak = tx.downgrade();
        let depth: Depth = Box::new(move || {
            weak.upgrade()
                .map_or(0, |s| s.max_capacity() - s.capacity())
        });
        self.gauges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Gauge {
                name,
                capacity,
                depth,
            });
        (tx, rx)
    }

    /// `(name, capacity, messages queued now)` of every channel.
    pub fn depths(&self) -> Vec<(&'static str, usize, usize)> {
        self.gauges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|g| (g.name, g.capacity, (g.depth)()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depths_are_measured_by_name() {
        let c = Channels::default();
        let (tx, mut rx) = c.bounded::<u32>("test", 4);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(c.depths(), vec![("test", 4, 2)]);
        rx.try_recv().unwrap();
        assert_eq!(c.depths(), vec![("test", 4, 1)]);
        drop(tx);
        assert_eq!(c.depths(), vec![("test", 4, 0)]);
    }
}
