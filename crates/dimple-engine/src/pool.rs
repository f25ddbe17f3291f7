//! Accounting for the prefix-cache memory pool: a byte budget that admission checks, so
//! that load turns into queueing instead of out-of-memory.

/// Whether a request's cache fits now, later, or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Ok,
    Later,
    Impossible,
}

/// Bytes reserved by running requests against a fixed budget. A reservation is released
/// exactly once, when its request leaves the engine (finished, cancelled or failed).
#[derive(Debug)]
pub struct CachePool {
    budget: usize,
    used: usize,
}

impl CachePool {
    pub fn new(budget: usize) -> Self {
        Self { budget, used: 0 }
    }

    pub fn check(&self, bytes: usize) -> Admission {
        if bytes > self.budget {
            Admission::Impossible
        } else if self.used + bytes > self.budget {
            Admission::Later
        } else {
            Admission::Ok
        }
    }

    /// Reserves `bytes` if they fit now.
    pub fn reserve(&mut self, bytes: usize) -> Admission {
        let a = self.check(bytes);
        if a == Admission::Ok {
            self.used += bytes;
        }
        a
    }

    pub fn release(&mut self, bytes: usize) {
        debug_assert!(bytes <= self.used, "releasing more than reserved");
        self.used = self.used.saturating_sub(bytes);
    }

    pub fn used(&self) -> usize {
        self.used
    }

    pub fn budget(&self) -> usize {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_answers_ok_later_impossible() {
        let mut p = CachePool::new(100);
        assert_eq!(p.reserve(60), Admission::Ok);
        assert_eq!(p.check(50), Admission::Later);
        assert_eq!(p.reserve(50), Admission::Later);
        assert_eq!(p.used(), 60);
        assert_eq!(p.check(101), Admission::Impossible);
        p.release(60);
        assert_eq!(p.reserve(100), Admission::Ok);
        assert_eq!(p.used(), 100);
    }
}
