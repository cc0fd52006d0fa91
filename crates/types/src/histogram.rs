//! A histogram of durations for `/metrics`: power-of-two buckets of microseconds, counted with
//! relaxed atomics so that any thread may count into a shared one. Durations are passed in; this
//! reads no clock.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Bucket `k` counts durations of at most 2^(k+4) µs (16 µs … 8.4 s); one more counts the rest.
const BUCKETS: usize = 20;

/// A histogram of durations in power-of-two buckets of microseconds.
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BUCKETS + 1],
            sum_us: AtomicU64::new(0),
        }
    }

    /// Counts `times` events that each took `elapsed`.
    pub fn observe(&self, elapsed: Duration, times: u64) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(us)].fetch_add(times, Relaxed);
        self.sum_us.fetch_add(us.saturating_mul(times), Relaxed);
    }

    /// Appends the Prometheus text of this histogram (cumulative buckets, bounds in seconds);
    /// `labels` is what goes inside the braces (`stage="commit"`), or nothing.
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let (before_le, braced) = if labels.is_empty() {
            (String::new(), String::new())
        } else {
            (format!("{labels},"), format!("{{{labels}}}"))
        };
        let mut cumulative = 0;
        for (k, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Relaxed);
            let le = if k < BUCKETS {
                format!("{}", upper_bound_us(k) as f64 / 1e6)
            } else {
                "+Inf".to_owned()
            };
            let _ = writeln!(out, "{name}_bucket{{{before_le}le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{braced} {sum}");
        let _ = writeln!(out, "{name}_count{braced} {cumulative}");
    }
}

/// Appends a histogram family in the Prometheus text format: its help and type, then each series
/// (its labels, as inside the braces, or nothing).
pub fn render_family(name: &str, help: &str, series: &[(&str, &Histogram)], out: &mut String) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (labels, histogram) in series {
        histogram.render(name, labels, out);
    }
}

/// The largest duration, in microseconds, bucket `k` counts.
const fn upper_bound_us(k: usize) -> u64 {
    1 << (k + 4)
}

/// The bucket a duration of `us` microseconds falls in.
fn bucket_of(us: u64) -> usize {
    if us <= upper_bound_us(0) {
        return 0;
    }
    let bits = (u64::BITS - (us - 1).leading_zeros()) as usize;
    (bits - 4).min(BUCKETS)
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_in_the_smallest_bucket_that_holds_them() {
        for (us, bucket) in [
            (0, 0),
            (16, 0),
            (17, 1),
            (32, 1),
            (33, 2),
            (1_000, 6),
            (1_024, 6),
            (1_025, 7),
            (8_388_608, 19),
            (8_388_609, 20),
            (u64::MAX, 20),
        ] {
            assert_eq!(bucket_of(us), bucket, "{us} µs");
        }
    }

    #[test]
    fn rendered_buckets_are_cumulative_with_bounds_in_seconds() {
        let histogram = Histogram::new();
        histogram.observe(Duration::from_micros(10), 2);
        histogram.observe(Duration::from_micros(1_000), 1);
        histogram.observe(Duration::from_secs(60), 1);
        let mut out = String::new();
        histogram.render("m", "stage=\"x\"", &mut out);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "m_bucket{stage=\"x\",le=\"0.000016\"} 2");
        assert_eq!(lines[5], "m_bucket{stage=\"x\",le=\"0.000512\"} 2");
        assert_eq!(lines[6], "m_bucket{stage=\"x\",le=\"0.001024\"} 3");
        assert_eq!(lines[19], "m_bucket{stage=\"x\",le=\"8.388608\"} 3");
        assert_eq!(lines[20], "m_bucket{stage=\"x\",le=\"+Inf\"} 4");
        assert_eq!(lines[21], "m_sum{stage=\"x\"} 60.00102");
        assert_eq!(lines[22], "m_count{stage=\"x\"} 4");

        let mut unlabelled = String::new();
        histogram.render("m", "", &mut unlabelled);
        assert!(
            unlabelled.starts_with("m_bucket{le=\"0.000016\"} 2\n"),
            "{unlabelled}"
        );
        assert!(
            unlabelled.ends_with("m_sum 60.00102\nm_count 4\n"),
            "{unlabelled}"
        );
    }
}
