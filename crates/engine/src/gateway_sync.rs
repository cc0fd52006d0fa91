//! Keeping a gateway's copy of its child list in step: `add_sub_device_notify` and
//! `delete_sub_device_notify` for what the API (or a lapsed registration) changed, and the
//! answer to `sub_device_sync_request`: the deletions since the gateway's version, then the whole
//! list, a hundred children a notification.
//!
//! Device SDKs drop a notification whose version is not above the last one they kept, so the
//! notifications to one gateway are sent in order under its connection's delivery turn, each
//! taking its version as it is sent.

use std::sync::atomic::Ordering;

use ioda_store::ChildDeletion;
use ioda_types::Device;
use serde_json::{Value, json};

use crate::Platform;
use crate::downlink::new_request_id;
use crate::events::{event_body, events_down_topic};
use crate::gateway::{MAX_CHILDREN_PER_REPORT, SUB_DEVICE_MANAGER, child_info};

/// Deletions a sync answer names, at most (older ones are beyond what a gateway away that long
/// can expect to hear).
const MAX_DELETIONS_PER_SYNC: i64 = 10_000;
/// Children a sync answer lists, at most.
const MAX_CHILDREN_PER_SYNC: usize = 50_000;

/// One notification to a gateway: its event type and the devices it names.
type Notification = (&'static str, Vec<Value>);

fn deletion_entry(gateway_id: &str, device_id: &str, node_id: &str) -> Value {
    json!({ "parent_device_id": gateway_id, "node_id": node_id, "device_id": device_id })
}

impl Platform {
    /// A fresh version of a gateway's child list: strictly greater than every one handed out
    /// before, across restarts too (it starts from the clock).
    pub(crate) fn next_children_version(&self) -> i64 {
        let now = self.now();
        let next = |last: i64| last.max(now - 1) + 1;
        let mut last = self.children_version.load(Ordering::SeqCst);
        loop {
            match self.children_version.compare_exchange(
                last,
                next(last),
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return next(last),
                Err(current) => last = current,
            }
        }
    }

    /// Sends `notifications` to a connected gateway in order, each with a version taken as it
    /// is sent; `false` when the gateway is not connected or went away meanwhile.
    async fn notify_children(&self, gateway_id: &str, notifications: Vec<Notification>) -> bool {
        let Some(link) = self.registry.link(gateway_id) else {
            return false;
        };
        let _turn = link.delivery.lock().await;
        for (event_type, devices) in notifications {
            let paras = json!({ "devices": devices, "version": self.next_children_version() });
            // IoTDA's platform events always carry an id.
            let event_id = Some(new_request_id(self.now()));
            let body = event_body(
                gateway_id,
                SUB_DEVICE_MANAGER,
                event_type,
                event_id,
                paras,
                self.now(),
            );
            let topic = events_down_topic(gateway_id);
            if self.push(gateway_id, topic, body, false).await.is_err() {
                let detail = json!({ "event_type": event_type, "why": "the gateway went away" });
                self.trace_now(gateway_id, "event_not_sent", detail).await;
                return false;
            }
        }
        true
    }

    /// Tells a connected gateway that the API added one of its children.
    pub(crate) async fn notify_child_added(&self, child: &Device) {
        if child.gateway_id != child.device_id {
            let entry = child_info(self, child);
            self.notify_children(
                &child.gateway_id,
                vec![("add_sub_device_notify", vec![entry])],
            )
            .await;
        }
    }

    /// A child was deleted: the deletion is kept for the gateway's next sync and, when `notify`
    /// (the gateway did not ask for it itself), sent to the gateway if it is connected.
    pub(crate) async fn child_deleted(&self, child: &Device, notify: bool) {
        if child.gateway_id == child.device_id {
            return;
        }
        let deletion = ChildDeletion {
            device_id: child.device_id.clone(),
            node_id: child.node_id.clone(),
            version: self.next_children_version(),
        };
        let kept = self
            .store
            .record_child_deletion(child.gateway_id.clone(), deletion, self.now())
            .await;
        if let Err(error) = kept {
            tracing::warn!(%error, device_id = %child.device_id, "could not keep a child's deletion for its gateway");
        }
        if notify {
            let entry = deletion_entry(&child.gateway_id, &child.device_id, &child.node_id);
            let notification = ("delete_sub_device_notify", vec![entry]);
            self.notify_children(&child.gateway_id, vec![notification])
                .await;
        }
    }

    /// The answer to a gateway's `sub_device_sync_request` with the version it holds: the
    /// children deleted since, then every child. Read a page at a time, so a large list costs
    /// no more memory than a page.
    pub(crate) async fn sync_children(&self, gateway_id: &str, since: Option<i64>) {
        let mut deletions = Vec::new();
        if let Some(since) = since.filter(|v| *v > 0) {
            match self
                .store
                .child_deletions_since(gateway_id.to_owned(), since, MAX_DELETIONS_PER_SYNC)
                .await
            {
                Ok(found) => deletions = found,
                Err(error) => {
                    tracing::warn!(%error, %gateway_id, "could not read a gateway's deleted children")
                }
            }
        }
        let deleted: Vec<Value> = deletions
            .iter()
            .map(|d| deletion_entry(gateway_id, &d.device_id, &d.node_id))
            .collect();
        let notifications = deleted
            .chunks(MAX_CHILDREN_PER_REPORT)
            .map(|chunk| ("delete_sub_device_notify", chunk.to_vec()))
            .collect();
        if !self.notify_children(gateway_id, notifications).await {
            return;
        }
        let (mut after, mut listed) = (0, 0);
        for page_number in 0.. {
            let page = self
                .store
                .children_page(gateway_id.to_owned(), after, MAX_CHILDREN_PER_REPORT as i64)
                .await;
            let page = match page {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(%error, %gateway_id, "could not read a gateway's children");
                    return;
                }
            };
            // A gateway without children hears so too (an empty list, and the version).
            if page.is_empty() && page_number > 0 {
                break;
            }
            let last_page = page.len() < MAX_CHILDREN_PER_REPORT;
            after = page.last().map_or(after, |d| d.seq);
            listed += page.len();
            let devices = page.iter().map(|d| child_info(self, d)).collect();
            let notification = ("add_sub_device_notify", devices);
            if !self.notify_children(gateway_id, vec![notification]).await {
                return;
            }
            if last_page || listed >= MAX_CHILDREN_PER_SYNC {
                break;
            }
        }
    }
}
