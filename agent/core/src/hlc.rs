//! Hybrid logical clock (HLC).
//!
//! A timestamp packs 48 bits of wall-clock milliseconds and a 16-bit logical
//! counter into one `u64`, so ordering timestamps is ordering integers. The
//! clock never goes backwards, stays close to wall time, and after observing a
//! remote timestamp every later local timestamp is larger than it.

use serde::{Deserialize, Serialize};

const LOGICAL_BITS: u32 = 16;
const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;

/// One hybrid-logical-clock timestamp (wall milliseconds << 16 | logical counter).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Hlc(pub u64);

impl Hlc {
    /// Builds a timestamp from wall-clock milliseconds and a logical counter.
    pub fn new(wall_ms: u64, logical: u16) -> Self {
        Hlc((wall_ms << LOGICAL_BITS) | u64::from(logical))
    }

    /// The wall-clock milliseconds part.
    pub fn wall_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// The logical counter part.
    pub fn logical(self) -> u16 {
        (self.0 & LOGICAL_MASK) as u16
    }
}

/// Why a remote timestamp was not taken into the clock.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    /// The remote timestamp is further ahead of our wall clock than allowed.
    /// The clock is left unchanged, so one peer with a broken clock cannot drag
    /// every timestamp in the cluster into the future.
    #[error("remote clock is {ahead_ms} ms ahead of ours (limit {limit_ms} ms)")]
    TooFarAhead {
        /// How far ahead the remote timestamp was.
        ahead_ms: u64,
        /// The configured limit.
        limit_ms: u64,
    },
}

/// A hybrid logical clock: hands out strictly increasing timestamps.
#[derive(Debug, Clone)]
pub struct Clock {
    last: Hlc,
    max_drift_ms: u64,
}

impl Clock {
    /// A clock that refuses remote timestamps more than `max_drift_ms` ahead of wall time.
    pub fn new(max_drift_ms: u64) -> Self {
        Clock {
            last: Hlc(0),
            max_drift_ms,
        }
    }

    /// The next local timestamp: larger than every timestamp handed out or observed.
    pub fn now(&mut self, wall_ms: u64) -> Hlc {
        let physical = Hlc::new(wall_ms, 0);
        self.last = physical.max(Hlc(self.last.0.saturating_add(1)));
        self.last
    }

    /// Takes a timestamp seen in a message into account.
    pub fn observe(&mut self, remote: Hlc, wall_ms: u64) -> Result<(), ClockError> {
        let ahead_ms = remote.wall_ms().saturating_sub(wall_ms);
        if ahead_ms > self.max_drift_ms {
            return Err(ClockError::TooFarAhead {
                ahead_ms,
                limit_ms: self.max_drift_ms,
            });
        }
        self.last = self.last.max(remote);
        Ok(())
    }

    /// The last timestamp handed out or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn packs_wall_and_logical() {
        let h = Hlc::new(1_700_000_000_000, 7);
        assert_eq!(h.wall_ms(), 1_700_000_000_000);
        assert_eq!(h.logical(), 7);
    }

    #[test]
    fn refuses_far_future_remote() {
        let mut c = Clock::new(1_000);
        let before = c.now(10_000);
        let err = c.observe(Hlc::new(20_000, 0), 10_000).unwrap_err();
        assert_eq!(
            err,
            ClockError::TooFarAhead {
                ahead_ms: 10_000,
                limit_ms: 1_000
            }
        );
        assert_eq!(c.last(), before);
    }

    proptest! {
        /// Whatever the wall clock does (including going backwards), local
        /// timestamps strictly increase.
        #[test]
        fn strictly_monotonic(walls in proptest::collection::vec(0u64..1_000_000, 1..200)) {
            let mut c = Clock::new(u64::MAX);
            let mut prev = Hlc(0);
            for w in walls {
                let t = c.now(w);
                prop_assert!(t > prev);
                prop_assert!(t.wall_ms() >= w);
                prev = t;
            }
        }

        /// After observing a remote timestamp, the next local one is larger
        /// (happens-before is preserved across nodes).
        #[test]
        fn observe_then_now_is_later(
            local in proptest::collection::vec(0u64..1_000_000, 0..50),
            remote_wall in 0u64..1_000_000,
            remote_logical in any::<u16>(),
            wall in 0u64..1_000_000,
        ) {
            let mut c = Clock::new(u64::MAX);
            for w in local { c.now(w); }
            let remote = Hlc::new(remote_wall, remote_logical);
            c.observe(remote, wall).unwrap();
            prop_assert!(c.now(wall) > remote);
        }

        /// The clock never runs further ahead of the largest wall time seen
        /// than the logical counter allows while timestamps stay unique.
        #[test]
        fn stays_near_wall_time(n in 1usize..1000, wall in 1u64..1_000_000) {
            let mut c = Clock::new(u64::MAX);
            let mut t = Hlc(0);
            for _ in 0..n { t = c.now(wall); }
            prop_assert_eq!(t.wall_ms(), wall);
            prop_assert_eq!(usize::from(t.logical()), n - 1);
        }
    }
}
