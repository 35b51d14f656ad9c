//! A small fixed-bucket histogram of durations, for metrics (Prometheus buckets)
//! and for quantiles in benchmarks. No allocation after creation.

/// Upper bounds of the buckets, in seconds: 0.1 ms to 10 s, roughly ×2.5 apart.
pub const BUCKETS_SECS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Counts of observations per bucket, with their sum and maximum.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations per bucket of [`BUCKETS_SECS`] (not cumulative); the last entry
    /// counts those above the largest bound.
    pub counts: [u64; BUCKETS_SECS.len() + 1],
    /// Sum of all observations, seconds.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
    /// Largest observation, seconds.
    pub max: f64,
}

impl Histogram {
    /// Records one observation of `secs` seconds.
    pub fn observe(&mut self, secs: f64) {
        let secs = if secs.is_finite() { secs.max(0.0) } else { 0.0 };
        let i = BUCKETS_SECS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS_SECS.len());
        self.counts[i] += 1;
        self.sum += secs;
        self.count += 1;
        if secs > self.max {
            self.max = secs;
        }
    }

    /// Adds every observation of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    /// An upper bound of the `q` quantile (0..=1): the bound of the bucket that
    /// holds it (the maximum for the overflow bucket). 0 without observations.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let want = ((self.count as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return BUCKETS_SECS
                    .get(i)
                    .copied()
                    .unwrap_or(self.max)
                    .min(self.max);
            }
        }
        self.max
    }

    /// `(upper bound, cumulative count)` per bucket, as Prometheus wants them
    /// (`+Inf` is the total count).
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        let mut acc = 0;
        BUCKETS_SECS.iter().enumerate().map(move |(i, b)| {
            acc += self.counts[i];
            (*b, acc)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_bounds() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.99), 0.0);
        for _ in 0..99 {
            h.observe(0.0003);
        }
        h.observe(0.2);
        assert_eq!(h.count, 100);
        assert_eq!(h.quantile(0.5), 0.0005);
        assert_eq!(h.quantile(0.99), 0.0005);
        assert_eq!(h.quantile(1.0), 0.2, "capped by the maximum");
        assert!((h.max - 0.2).abs() < 1e-12);
        let mut g = Histogram::default();
        g.observe(20.0);
        h.merge(&g);
        assert_eq!(h.quantile(1.0), 20.0);
        assert_eq!(h.cumulative().last(), Some((10.0, 100)));
    }
}
