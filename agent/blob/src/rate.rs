//! A sans-IO token bucket capping an agent's upload rate.

/// Token bucket over bytes, driven by the caller's monotonic clock (ms).
///
/// Tokens refill at `bytes_per_sec` up to `burst`. A request larger than
/// `burst` is let through once the bucket is full and leaves it in debt, so
/// chunks bigger than the burst still flow and the long-run rate still holds.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    /// 0 = unlimited.
    rate: u64,
    /// In milli-bytes (bytes × 1000) so refills of a few ms are exact.
    burst_milli: i128,
    tokens_milli: i128,
    last_ms: Option<u64>,
}

impl RateLimiter {
    /// A limiter allowing `bytes_per_sec` on average and `burst` bytes at once.
    /// `bytes_per_sec == 0` disables the cap. Starts full.
    pub fn new(bytes_per_sec: u64, burst: u64) -> Self {
        let burst_milli = i128::from(burst.max(1)) * 1000;
        RateLimiter {
            rate: bytes_per_sec,
            burst_milli,
            tokens_milli: burst_milli,
            last_ms: None,
        }
    }

    /// A limiter that never refuses.
    pub fn unlimited() -> Self {
        Self::new(0, 1)
    }

    /// Whether this limiter caps anything.
    pub fn is_limited(&self) -> bool {
        self.rate > 0
    }

    fn refill(&mut self, now_ms: u64) {
        // A clock that goes backwards refills nothing rather than panicking.
        let elapsed = self.last_ms.map_or(0, |last| now_ms.saturating_sub(last));
        if self.last_ms.is_none_or(|last| now_ms > last) {
            self.last_ms = Some(now_ms);
        }
        // bytes/s × ms = milli-bytes.
        let add = i128::from(elapsed) * i128::from(self.rate);
        self.tokens_milli = (self.tokens_milli + add).min(self.burst_milli);
    }

    /// Takes `n` bytes' worth of tokens, or says how many ms until it could.
    pub fn try_take(&mut self, n: u64, now_ms: u64) -> Result<(), u64> {
        if self.rate == 0 {
            return Ok(());
        }
        self.refill(now_ms);
        let need = (i128::from(n) * 1000).min(self.burst_milli);
        if self.tokens_milli >= need {
            self.tokens_milli -= i128::from(n) * 1000;
            return Ok(());
        }
        let deficit = need - self.tokens_milli;
        let rate = i128::from(self.rate);
        let wait = (deficit + rate - 1) / rate;
        Err(u64::try_from(wait).unwrap_or(u64::MAX).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_steady_rate() {
        // 1 MB/s with a 256 KB burst.
        let mut r = RateLimiter::new(1_000_000, 256_000);
        assert_eq!(r.try_take(256_000, 0), Ok(()));
        // Empty: 100 KB needs 100 ms.
        assert_eq!(r.try_take(100_000, 0), Err(100));
        assert_eq!(r.try_take(100_000, 99), Err(1));
        assert_eq!(r.try_take(100_000, 100), Ok(()));
        // Refill is capped at the burst however long we idle.
        assert_eq!(r.try_take(256_000, 1_000_000), Ok(()));
        assert!(r.try_take(1, 1_000_000).is_err());
    }

    #[test]
    fn long_run_rate_holds() {
        let mut r = RateLimiter::new(500_000, 64_000);
        let mut now = 0;
        let mut sent = 0u64;
        while now < 10_000 {
            match r.try_take(16_000, now) {
                Ok(()) => sent += 16_000,
                Err(wait) => now += wait,
            }
        }
        // 10 s at 500 KB/s plus the initial burst, within one request.
        let max = 500_000 * 10 + 64_000 + 16_000;
        assert!(
            sent <= max && sent >= max - 2 * 16_000 - 64_000,
            "sent {sent}"
        );
    }

    #[test]
    fn requests_larger_than_burst_pass_when_full_and_go_into_debt() {
        let mut r = RateLimiter::new(1_000, 100);
        assert_eq!(r.try_take(1_000, 0), Ok(()));
        // 900 bytes of debt plus 100 to refill the bucket: a full second.
        assert_eq!(r.try_take(1_000, 0), Err(1000));
        assert_eq!(r.try_take(1_000, 1000), Ok(()));
    }

    #[test]
    fn unlimited_and_clock_going_back() {
        let mut r = RateLimiter::unlimited();
        assert!(!r.is_limited());
        assert_eq!(r.try_take(u64::MAX, 0), Ok(()));
        let mut r = RateLimiter::new(1000, 1000);
        assert_eq!(r.try_take(1000, 5000), Ok(()));
        assert!(r.try_take(1, 10).is_err());
        assert_eq!(r.try_take(1000, 6000), Ok(()));
    }
}
