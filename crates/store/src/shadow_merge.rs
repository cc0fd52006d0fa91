//! A group commit's shadow merges, one write per device and service.
//!
//! Every property report merges into its device's shadow row. Under load one group commit holds
//! several reports of the same device (flat out, with 16 publishes in flight per device, about
//! five), and each used to rewrite the row: seek, merge, write. The reports of a batch now only
//! note their merge here, and the batch writes each row once before it commits, applying the
//! noted merges in report order inside one statement (`jsonb_patch` nested), so the stored
//! result is exactly that of merging them one by one. Only runs of reports whose properties hold
//! no object are folded into one patch first: for those, folding is exact; JSON merge patch does
//! not compose over nested objects, so those are applied one by one.

use std::fmt::Write as _;
use std::sync::OnceLock;

use rusqlite::Connection;
use serde_json::{Map, Value};

use crate::{FastMap, StoreError};

/// Merges one statement applies at most; a longer run is written in several.
const MERGES_PER_STATEMENT: usize = 8;

/// The merges noted so far, by device, then service (nested, so a lookup allocates nothing).
#[derive(Default)]
pub(crate) struct ShadowMerges {
    pending: FastMap<String, FastMap<String, Pending>>,
}

struct Pending {
    /// The merges to apply, as JSON text, oldest first: the first report's properties, then
    /// the later reports' (a run of them folded into one, see `run`).
    patches: Vec<String>,
    /// Later reports whose properties hold no object, folded into one patch (later keys win):
    /// merging such patches one after the other is merging their fold, whatever they merge
    /// into, and it saves parsing and merging each (a fifth of the writer's time flat out).
    run: Option<Map<String, Value>>,
    /// Reports noted (the shadow's version grows by one for each).
    reports: i64,
    /// The newest report's event time.
    reported_at: i64,
    /// The newest report's history row.
    last_history_id: i64,
}

impl ShadowMerges {
    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Notes a report's merge into the service's shadow: its properties and their JSON text.
    /// Returns the history row of the service's report noted before, if one waits here (the
    /// shadow row does not name it yet).
    pub(crate) fn note(
        &mut self,
        device_id: &str,
        service_id: &str,
        (properties, text): (&Map<String, Value>, &str),
        reported_at: i64,
        history_id: i64,
    ) -> Result<Option<i64>, StoreError> {
        let services = match self.pending.get_mut(device_id) {
            Some(services) => services,
            None => self.pending.entry(device_id.to_owned()).or_default(),
        };
        let Some(pending) = services.get_mut(service_id) else {
            let first = Pending {
                patches: vec![text.to_owned()],
                run: None,
                reports: 1,
                reported_at,
                last_history_id: history_id,
            };
            services.insert(service_id.to_owned(), first);
            return Ok(None);
        };
        let previous = pending.last_history_id;
        if properties.values().any(Value::is_object) {
            pending.end_run()?;
            pending.patches.push(text.to_owned());
        } else {
            // In place: a device repeats its keys, so the run's keys and strings are reused.
            let run = pending.run.get_or_insert_with(Map::new);
            for (key, value) in properties {
                match run.get_mut(key.as_str()) {
                    Some(slot) => assign(slot, value),
                    None => {
                        run.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        pending.reports += 1;
        pending.reported_at = reported_at;
        pending.last_history_id = history_id;
        Ok(Some(previous))
    }

    /// Writes every noted merge (each shadow row once per `MERGES_PER_STATEMENT` merges) and
    /// forgets them.
    pub(crate) fn flush(&mut self, c: &Connection) -> Result<(), StoreError> {
        for (device_id, services) in self.pending.drain() {
            for (service_id, pending) in services {
                pending.write(c, &device_id, &service_id)?;
            }
        }
        Ok(())
    }
}

impl Pending {
    /// Writes the service's shadow row: its merges in order, `MERGES_PER_STATEMENT` at a time.
    fn write(
        mut self,
        c: &Connection,
        device_id: &str,
        service_id: &str,
    ) -> Result<(), StoreError> {
        self.end_run()?;
        let mut reports = self.reports;
        for chunk in self.patches.chunks(MERGES_PER_STATEMENT) {
            let mut statement = c.prepare_cached(upsert_sql(chunk.len()))?;
            let mut values: Vec<&dyn rusqlite::ToSql> = vec![
                &device_id,
                &service_id,
                &self.reported_at,
                &self.last_history_id,
                &reports,
            ];
            values.extend(chunk.iter().map(|p| p as &dyn rusqlite::ToSql));
            statement.execute(values.as_slice())?;
            // The version counts reports, once.
            reports = 0;
        }
        Ok(())
    }

    /// Closes the run of folded patches, as the next patch to apply.
    fn end_run(&mut self) -> Result<(), StoreError> {
        if let Some(run) = self.run.take() {
            self.patches.push(serde_json::to_string(&run)?);
        }
        Ok(())
    }
}

/// Makes `slot` a copy of `value`, reusing the slot's string where both are strings.
fn assign(slot: &mut Value, value: &Value) {
    match (slot, value) {
        (Value::String(old), Value::String(new)) => old.clone_from(new),
        (slot, value) => *slot = value.clone(),
    }
}

/// The upsert applying `n` merges (1 to `MERGES_PER_STATEMENT`), built once.
fn upsert_sql(n: usize) -> &'static str {
    static BUILT: OnceLock<Vec<String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| (1..=MERGES_PER_STATEMENT).map(build_upsert_sql).collect());
    built
        .get(n.clamp(1, MERGES_PER_STATEMENT) - 1)
        .map_or("", String::as_str)
}

/// The upsert applying `n` merges in order: `?1` device, `?2` service, `?3` event time, `?4`
/// history row, `?5` how many reports they are (the version grows by one per report), `?6`… the
/// patches. A new row starts from the first patch as it is (as a single report's row always did).
fn build_upsert_sql(n: usize) -> String {
    let nested = |base: &str, first: usize| {
        let mut sql = base.to_owned();
        for i in first..n {
            sql = format!("jsonb_patch({sql}, ?{})", 6 + i);
        }
        sql
    };
    let mut sql = String::from(
        "INSERT INTO shadows (device_id, service_id, reported, reported_at, version, last_history_id) VALUES (?1, ?2, ",
    );
    let _ = write!(
        sql,
        "{}, ?3, ?5, ?4) ON CONFLICT (device_id, service_id) DO UPDATE SET reported = {}, \
         reported_at = excluded.reported_at, version = version + ?5, last_history_id = excluded.last_history_id",
        nested("jsonb(?6)", 1),
        nested("COALESCE(reported, jsonb('{}'))", 0),
    );
    sql
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::{Durability, ReportRecord, Store};
    use ioda_types::event::ReportedService;

    fn report(device: &str, properties: &Value, t: i64) -> ReportRecord {
        ReportRecord {
            device_id: device.into(),
            request_id: format!("r{t}"),
            received_at: t,
            services: vec![ReportedService::new(
                "S".into(),
                properties.as_object().unwrap().clone(),
                t,
            )],
        }
    }

    /// Submits the reports while the writer is held, so that they commit in one batch.
    async fn in_one_batch(store: &Store, reports: Vec<ReportRecord>) {
        let hold = store.write(|_| {
            std::thread::sleep(Duration::from_millis(200));
            Ok(())
        });
        let submit = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut committed = Vec::new();
            for report in reports {
                committed.push(
                    store
                        .submit_report(report, vec![], vec![], None)
                        .await
                        .unwrap(),
                );
            }
            for commit in committed {
                commit.await.unwrap().unwrap();
            }
        };
        let (held, ()) = tokio::join!(hold, submit);
        held.unwrap();
    }

    async fn shadow_of(store: &Store, device: &str) -> (Value, i64, Option<i64>) {
        let rows = store.shadow(device.into()).await.unwrap();
        let row = &rows[0];
        (
            Value::Object(row.reported.clone().unwrap()),
            row.version,
            row.reported_at,
        )
    }

    #[tokio::test]
    async fn reports_of_one_batch_merge_as_if_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db"), Durability::Normal).unwrap();
        let first = store.submit_report(
            report("d1", &json!({"k": {"b": 2}, "x": 1}), 1),
            vec![],
            vec![],
            None,
        );
        first.await.unwrap().await.unwrap().unwrap();

        // Order matters: a scalar then an object replaces the stored object; a null removes.
        let mut d1 = vec![
            json!({"k": 5}),
            json!({"k": {"a": 1}}),
            json!({"x": null, "y": [1]}),
            json!({"k": {"c": 3}}),
        ];
        // More than one statement's worth, flat reports folded between nested ones.
        d1.extend((0..10).map(|n| match n % 2 {
            0 => json!({ "n": n }),
            _ => json!({ "o": { format!("i{n}"): n } }),
        }));
        // A device new to the batch: its row starts from its first report as it is.
        let d2 = [
            json!({"a": 1, "z": null}),
            json!({"b": 2}),
            json!({"a": null}),
        ];
        let mut reports = Vec::new();
        for (i, (p1, p2)) in d1
            .iter()
            .zip(d2.iter().map(Some).chain(std::iter::repeat(None)))
            .enumerate()
        {
            let t = 10 + i as i64;
            reports.push(report("d1", p1, t));
            if let Some(p2) = p2 {
                reports.push(report("d2", p2, 100 + t));
            }
        }
        in_one_batch(&store, reports).await;

        assert_eq!(
            shadow_of(&store, "d1").await,
            (
                json!({"k": {"a": 1, "c": 3}, "y": [1], "n": 8, "o": {"i1": 1, "i3": 3, "i5": 5, "i7": 7, "i9": 9}}),
                15,
                Some(23)
            )
        );
        assert_eq!(
            shadow_of(&store, "d2").await,
            (json!({"z": null, "b": 2}), 3, Some(112))
        );
        // The history chain runs through every report of the batch, newest first.
        let history = store.property_history("d1".into(), 100).await.unwrap();
        let times: Vec<i64> = history.iter().map(|h| h.event_time).collect();
        let mut want: Vec<i64> = (10..24).rev().collect();
        want.push(1);
        assert_eq!(times, want);
        let history = store.property_history("d2".into(), 100).await.unwrap();
        assert_eq!(
            history.iter().map(|h| h.event_time).collect::<Vec<_>>(),
            vec![112, 111, 110]
        );
        store.close().await;
    }

    #[test]
    fn the_upsert_applies_the_merges_in_order() {
        assert_eq!(
            upsert_sql(1),
            "INSERT INTO shadows (device_id, service_id, reported, reported_at, version, last_history_id) \
             VALUES (?1, ?2, jsonb(?6), ?3, ?5, ?4) ON CONFLICT (device_id, service_id) DO UPDATE SET \
             reported = jsonb_patch(COALESCE(reported, jsonb('{}')), ?6), reported_at = excluded.reported_at, \
             version = version + ?5, last_history_id = excluded.last_history_id"
        );
        let three = upsert_sql(3);
        assert_eq!(upsert_sql(9), upsert_sql(MERGES_PER_STATEMENT));
        assert!(
            three.contains(
                "VALUES (?1, ?2, jsonb_patch(jsonb_patch(jsonb(?6), ?7), ?8), ?3, ?5, ?4)"
            )
        );
        assert!(three.contains(
            "reported = jsonb_patch(jsonb_patch(jsonb_patch(COALESCE(reported, jsonb('{}')), ?6), ?7), ?8)"
        ));
    }
}
