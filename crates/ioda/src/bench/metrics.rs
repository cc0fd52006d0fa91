//! The server's own account of where writes and PUBACKs spent their time, from its `/metrics`.

use serde_json::{Value, json};

use crate::client::ApiClient;

/// The stages reported, and the bucket series each is read from: a write job's wait in the
/// store (queue, transaction, sync), then a PUBACK's two stages in the MQTT layer.
const STAGES: [(&str, &str); 3] = [
    ("store_job", "ioda_store_job_commit_seconds_bucket{le=\""),
    (
        "commit",
        "ioda_mqtt_puback_stage_seconds_bucket{stage=\"commit\",le=\"",
    ),
    (
        "write",
        "ioda_mqtt_puback_stage_seconds_bucket{stage=\"write\",le=\"",
    ),
];

/// The cumulative bucket counts of one stage: (upper bound in seconds, count), in order.
type Buckets = Vec<(f64, u64)>;

/// The stage histograms the server has counted so far.
pub struct Snapshot {
    stages: Vec<Buckets>,
}

impl Snapshot {
    pub async fn take(api: &ApiClient) -> anyhow::Result<Snapshot> {
        Ok(Snapshot::parse(&api.get_text("/metrics").await?))
    }

    fn parse(text: &str) -> Snapshot {
        let stages = STAGES
            .iter()
            .map(|(_, prefix)| {
                text.lines()
                    .filter_map(|line| line.strip_prefix(prefix))
                    .filter_map(|rest| {
                        let (le, count) = rest.split_once("\"} ")?;
                        let le = if le == "+Inf" {
                            f64::INFINITY
                        } else {
                            le.parse().ok()?
                        };
                        Some((le, count.trim().parse().ok()?))
                    })
                    .collect()
            })
            .collect();
        Snapshot { stages }
    }

    /// What was counted between `earlier` and this snapshot, per stage: how many, and
    /// the bucket bounds (in ms, powers of two of µs) that hold the median and the 99th
    /// percentile (`null` beyond the largest bucket, 8.4 s).
    pub fn since(&self, earlier: &Snapshot) -> Value {
        let mut out = serde_json::Map::new();
        for (n, (stage, _)) in STAGES.iter().enumerate() {
            let now = &self.stages[n];
            let before = earlier.stages.get(n);
            let delta: Buckets = now
                .iter()
                .enumerate()
                .map(|(k, (le, count))| {
                    let was = before.and_then(|b| b.get(k)).map_or(0, |(_, c)| *c);
                    (*le, count.saturating_sub(was))
                })
                .collect();
            let total = delta.last().map_or(0, |(_, c)| *c);
            let bound_ms = |p: f64| {
                let wanted = (total as f64 * p).ceil() as u64;
                delta
                    .iter()
                    .find(|(_, c)| *c >= wanted.max(1))
                    .and_then(|(le, _)| le.is_finite().then(|| le * 1000.0))
            };
            out.insert(
                (*stage).to_owned(),
                json!({"count": total, "p50_at_most": bound_ms(0.5), "p99_at_most": bound_ms(0.99)}),
            );
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(commit: [u64; 3], write: [u64; 3]) -> String {
        let mut out = String::from("# TYPE ioda_mqtt_puback_stage_seconds histogram\n");
        for (series, counts) in [(STAGES[1].1, commit), (STAGES[2].1, write)] {
            for (le, count) in ["0.001024", "0.002048", "+Inf"].iter().zip(counts) {
                out.push_str(&format!("{series}{le}\"}} {count}\n"));
            }
        }
        out
    }

    #[test]
    fn the_difference_of_two_snapshots_gives_counts_and_percentile_bounds() {
        let before = Snapshot::parse(&text([1, 1, 1], [0, 0, 0]));
        let after = Snapshot::parse(&text([51, 100, 101], [200, 200, 200]));
        let got = after.since(&before);
        assert_eq!(got["commit"]["count"], 100);
        assert_eq!(got["commit"]["p50_at_most"], 1.024);
        assert_eq!(got["commit"]["p99_at_most"], 2.048);
        assert_eq!(got["write"]["count"], 200);
        assert_eq!(got["write"]["p99_at_most"], 1.024);
        assert_eq!(got["store_job"]["count"], 0, "not in this text");
    }

    #[test]
    fn a_server_without_the_metric_counts_nothing() {
        let none = Snapshot::parse("unrelated 1\n");
        let got = none.since(&none);
        assert_eq!(got["commit"]["count"], 0);
        assert_eq!(got["commit"]["p50_at_most"], Value::Null);
    }
}
