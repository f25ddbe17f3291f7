//! The router-wide retry budget: retries may add at most `ratio` of the requests seen over
//! a sliding window, plus a small floor so that a quiet router can still retry. When many
//! requests fail at once (a bad rollout, a query of death, a cluster-wide outage), retries
//! would otherwise multiply the load on the workers that are left.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many retries the router allows.
#[derive(Debug, Clone, Copy)]
pub struct RetryBudgetConfig {
    /// Retries allowed per request seen in the window.
    pub ratio: f64,
    /// Retries allowed in the window regardless of traffic.
    pub floor: u32,
    /// Length of the sliding window.
    pub window: Duration,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.1,
            floor: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// Buckets the window is cut into (the window slides one bucket at a time).
const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Index of the bucket-sized slice of time this bucket counts.
    slot: u64,
    requests: u64,
    retries: u64,
}

/// Counts requests and retries per bucket; one short lock per request or retry.
#[derive(Debug)]
pub struct RetryBudget {
    cfg: RetryBudgetConfig,
    epoch: Instant,
    buckets: Mutex<[Bucket; BUCKETS]>,
}

impl RetryBudget {
    pub fn new(cfg: RetryBudgetConfig) -> Self {
        Self {
            cfg,
            epoch: Instant::now(),
            buckets: Mutex::new([Bucket::default(); BUCKETS]),
        }
    }

    fn slot_at(&self, now: Instant) -> u64 {
        let width = (self.cfg.window / BUCKETS as u32).max(Duration::from_millis(1));
        (now.saturating_duration_since(self.epoch).as_nanos() / width.as_nanos()) as u64
    }

    fn with_window<T>(&self, now: Instant, f: impl FnOnce(&mut Bucket, u64, u64) -> T) -> T {
        let slot = self.slot_at(now);
        // A poisoned lock only means another request panicked mid-update of two counters.
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let cur = &mut b[(slot % BUCKETS as u64) as usize];
        if cur.slot != slot {
            *cur = Bucket {
                slot,
                ..Bucket::default()
            };
        }
        let oldest = slot.saturating_sub(BUCKETS as u64 - 1);
        let (requests, retries) = b
            .iter()
            .filter(|x| x.slot >= oldest && x.slot <= slot)
            .fold((0, 0), |(q, r), x| (q + x.requests, r + x.retries));
        f(&mut b[(slot % BUCKETS as u64) as usize], requests, retries)
    }

    /// Counts one request.
    pub fn record_request(&self) {
        self.record_request_at(Instant::now());
    }

    /// Takes one retry from the budget; false when the budget is spent.
    pub fn try_retry(&self) -> bool {
        self.try_retry_at(Instant::now())
    }

    fn record_request_at(&self, now: Instant) {
        self.with_window(now, |b, _, _| b.requests += 1);
    }

    fn try_retry_at(&self, now: Instant) -> bool {
        let (ratio, floor) = (self.cfg.ratio, self.cfg.floor);
        self.with_window(now, |b, requests, retries| {
            let allowed = f64::from(floor) + ratio * requests as f64;
            let ok = (retries as f64) < allowed;
            if ok {
                b.retries += 1;
            }
            ok
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> RetryBudget {
        RetryBudget::new(RetryBudgetConfig {
            ratio: 0.1,
            floor: 2,
            window: Duration::from_secs(10),
        })
    }

    #[test]
    fn the_floor_then_a_tenth_of_the_requests() {
        let b = budget();
        let t = b.epoch;
        assert!(b.try_retry_at(t));
        assert!(b.try_retry_at(t));
        assert!(!b.try_retry_at(t), "the floor of 2 is spent");
        for _ in 0..30 {
            b.record_request_at(t);
        }
        // 2 + 0.1 * 30 = 5 allowed, 2 taken.
        let granted = (0..10).filter(|_| b.try_retry_at(t)).count();
        assert_eq!(granted, 3);
    }

    #[test]
    fn the_window_slides() {
        let b = budget();
        let t = b.epoch;
        for _ in 0..2 {
            assert!(b.try_retry_at(t));
        }
        assert!(!b.try_retry_at(t + Duration::from_secs(9)));
        assert!(
            b.try_retry_at(t + Duration::from_secs(11)),
            "retries older than the window no longer count"
        );
    }
}
