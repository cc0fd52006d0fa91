//! A token bucket per connection: `rate` messages per second with a one-second burst.

/// Token bucket state, driven by the caller's clock.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u32,
    /// Thousandths of a token, so refills stay exact at millisecond resolution.
    milli_tokens: i64,
    last_ms: i64,
}

impl TokenBucket {
    pub fn new(rate: u32, now_ms: i64) -> Self {
        TokenBucket {
            rate,
            milli_tokens: i64::from(rate) * 1000,
            last_ms: now_ms,
        }
    }

    /// Takes one token; `false` when the rate is exceeded.
    pub fn try_take(&mut self, now_ms: i64) -> bool {
        if self.rate == 0 {
            return true;
        }
        let elapsed = (now_ms - self.last_ms).max(0);
        self.last_ms = now_ms;
        let cap = i64::from(self.rate) * 1000;
        self.milli_tokens = (self.milli_tokens + elapsed * i64::from(self.rate)).min(cap);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_rate_and_refuses_the_excess() {
        let mut bucket = TokenBucket::new(50, 0);
        let taken = (0..60).filter(|_| bucket.try_take(0)).count();
        assert_eq!(taken, 50);
        // 100 ms later five more tokens have accrued.
        let taken = (0..10).filter(|_| bucket.try_take(100)).count();
        assert_eq!(taken, 5);
        let mut unlimited = TokenBucket::new(0, 0);
        assert!((0..1000).all(|_| unlimited.try_take(0)));
    }
}
