//! Managing rules and actions: validation (subject, SQL with error positions, channel details),
//! persistence, and keeping the running dispatcher and workers in step.

use std::sync::Arc;

use ioda_engine::EngineError;
use ioda_store::{RoutingAction, RoutingRule};
use ioda_types::ids;
use serde_json::Value;

use crate::connector::{Connector, Spec};
use crate::envelope::parse_subject;
use crate::forward::{Forwarder, LEGACY_RESOURCE, live_rule, read, write};
use crate::report_queue::Source;
use crate::sql::compile;

/// A new rule (`AddRuleReq`).
#[derive(Debug, Clone, Default)]
pub struct NewRule {
    pub rule_name: Option<String>,
    pub description: Option<String>,
    pub resource: String,
    pub event: String,
    pub app_type: Option<String>,
    pub app_id: Option<String>,
    pub select: Option<String>,
    pub condition: Option<String>,
}

/// A rule change (`UpdateRuleReq`); `None` keeps a field.
#[derive(Debug, Clone, Default)]
pub struct RulePatch {
    pub rule_name: Option<String>,
    pub description: Option<String>,
    pub select: Option<String>,
    pub condition: Option<String>,
    pub active: Option<bool>,
}

fn invalid(msg: impl Into<String>) -> EngineError {
    EngineError::Invalid(msg.into())
}

fn check_sql(select: Option<&str>, condition: Option<&str>) -> Result<(), EngineError> {
    for (name, text) in [("select", select), ("where", condition)] {
        if text.is_some_and(|t| t.chars().count() > 2500) {
            return Err(invalid(format!("{name} must be at most 2500 characters")));
        }
    }
    compile(select, condition)
        .map(|_| ())
        .map_err(|e| invalid(e.to_string()))
}

fn new_id(now: i64) -> String {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    ids::object_id(now, bytes)
}

impl Forwarder {
    /// Checks a channel's details and, for brokers and databases, that the target answers now.
    async fn check_channel(&self, channel: &str, detail: &Value) -> Result<(), EngineError> {
        let spec = Spec::parse(channel, detail).map_err(invalid)?;
        if spec.is_broker() {
            Connector::open(&spec, std::time::Duration::from_secs(5))
                .await
                .map_err(|e| invalid(format!("cannot reach the target: {e}")))?;
        }
        Ok(())
    }

    fn refresh_rule(&self, rule: RoutingRule) {
        let mut rules = write(&self.rules);
        rules.retain(|r| r.rule.rule_id != rule.rule_id);
        if let Some(live) = live_rule(rule) {
            rules.push(Arc::new(live));
        }
    }

    /// Creates a rule (inactive, as in IoTDA, until it is updated with `active: true`).
    pub async fn create_rule(
        &self,
        project_id: &str,
        new: NewRule,
    ) -> Result<RoutingRule, EngineError> {
        parse_subject(&new.resource, &new.event).ok_or_else(|| {
            invalid(format!(
                "unknown subject: resource {:?} with event {:?}",
                new.resource, new.event
            ))
        })?;
        if new
            .rule_name
            .as_ref()
            .is_some_and(|n| n.chars().count() > 256)
        {
            return Err(invalid("rule_name must be at most 256 characters"));
        }
        let app_type = new.app_type.unwrap_or_else(|| "GLOBAL".into());
        if !matches!(app_type.as_str(), "GLOBAL" | "APP") {
            return Err(invalid("app_type must be GLOBAL or APP"));
        }
        if app_type == "APP" && new.app_id.is_none() {
            return Err(invalid("app_type APP needs app_id"));
        }
        check_sql(new.select.as_deref(), new.condition.as_deref())?;
        let now = self.platform.now();
        let resource = if new.resource == "device.commmad.status" {
            "device.command.status".to_owned()
        } else {
            new.resource
        };
        let rule = RoutingRule {
            seq: 0,
            rule_id: new_id(now),
            project_id: project_id.to_owned(),
            rule_name: new.rule_name,
            description: new.description,
            resource,
            event: new.event,
            app_type,
            app_id: new.app_id,
            select: new.select,
            condition: new.condition,
            active: false,
            created_at: now,
        };
        let rule = self.platform.store().save_rule(rule).await?;
        self.refresh_rule(rule.clone());
        Ok(rule)
    }

    /// One rule of the project.
    pub fn rule(&self, project_id: &str, rule_id: &str) -> Result<RoutingRule, EngineError> {
        read(&self.rules)
            .iter()
            .find(|r| {
                r.rule.rule_id == rule_id
                    && r.rule.project_id == project_id
                    && r.rule.resource != LEGACY_RESOURCE
            })
            .map(|r| r.rule.clone())
            .ok_or(EngineError::NotFound("rule"))
    }

    /// The project's rules matching `keep`, newest first.
    pub fn rules(&self, project_id: &str, keep: impl Fn(&RoutingRule) -> bool) -> Vec<RoutingRule> {
        let mut rules: Vec<RoutingRule> = read(&self.rules)
            .iter()
            .map(|r| r.rule.clone())
            .filter(|r| r.project_id == project_id && r.resource != LEGACY_RESOURCE && keep(r))
            .collect();
        rules.sort_by_key(|r| std::cmp::Reverse(r.seq));
        rules
    }

    /// Changes a rule; `select` and `where` are checked together.
    pub async fn update_rule(
        &self,
        project_id: &str,
        rule_id: &str,
        patch: RulePatch,
    ) -> Result<RoutingRule, EngineError> {
        let mut rule = self.rule(project_id, rule_id)?;
        // A clause left out keeps its value: dropping a filter silently would forward everything.
        if patch.select.is_some() {
            rule.select = patch.select;
        }
        if patch.condition.is_some() {
            rule.condition = patch.condition;
        }
        check_sql(rule.select.as_deref(), rule.condition.as_deref())?;
        rule.rule_name = patch.rule_name.or(rule.rule_name);
        rule.description = patch.description.or(rule.description);
        rule.active = patch.active.unwrap_or(rule.active);
        let rule = self.platform.store().save_rule(rule).await?;
        self.refresh_rule(rule.clone());
        Ok(rule)
    }

    /// Deletes a rule with its actions and their queues.
    pub async fn delete_rule(&self, project_id: &str, rule_id: &str) -> Result<(), EngineError> {
        self.rule(project_id, rule_id)?;
        self.remove_rule_with_actions(rule_id).await
    }

    /// Stops a rule's actions, then deletes the rule with its actions and queues (a legacy
    /// subscription is a hidden rule, so both paths end here).
    async fn remove_rule_with_actions(&self, rule_id: &str) -> Result<(), EngineError> {
        let action_ids: Vec<String> = read(&self.actions)
            .values()
            .filter(|a| a.action.rule_id == rule_id)
            .map(|a| a.action.action_id.clone())
            .collect();
        for action_id in action_ids {
            self.stop_action(&action_id);
        }
        self.platform
            .store()
            .delete_rule(rule_id.to_owned())
            .await?;
        write(&self.rules).retain(|r| r.rule.rule_id != rule_id);
        Ok(())
    }

    /// Adds an action to a rule after checking its channel details.
    pub async fn create_action(
        self: &Arc<Self>,
        project_id: &str,
        rule_id: &str,
        channel: String,
        detail: Value,
    ) -> Result<RoutingAction, EngineError> {
        self.rule(project_id, rule_id)?;
        self.check_channel(&channel, &detail).await?;
        let now = self.platform.now();
        let action = RoutingAction {
            seq: 0,
            action_id: new_id(now),
            project_id: project_id.to_owned(),
            rule_id: rule_id.to_owned(),
            channel,
            channel_detail: detail,
            created_at: now,
        };
        let action = self.platform.store().save_action(action).await?;
        self.run_action(action.clone());
        Ok(action)
    }

    /// One action of the project.
    pub fn action(&self, project_id: &str, action_id: &str) -> Result<RoutingAction, EngineError> {
        read(&self.actions)
            .get(action_id)
            .filter(|a| a.action.project_id == project_id && !a.action.rule_id.is_empty())
            .map(|a| a.action.clone())
            .ok_or(EngineError::NotFound("action"))
    }

    /// The project's actions matching `keep`, newest first.
    pub fn actions(
        &self,
        project_id: &str,
        keep: impl Fn(&RoutingAction) -> bool,
    ) -> Vec<RoutingAction> {
        let mut actions: Vec<RoutingAction> = read(&self.actions)
            .values()
            .map(|a| a.action.clone())
            .filter(|a| a.project_id == project_id && !a.rule_id.is_empty() && keep(a))
            .collect();
        actions.sort_by_key(|a| std::cmp::Reverse(a.seq));
        actions
    }

    /// Changes an action's channel; its queue stays.
    pub async fn update_action(
        self: &Arc<Self>,
        project_id: &str,
        action_id: &str,
        channel: Option<String>,
        detail: Option<Value>,
    ) -> Result<RoutingAction, EngineError> {
        let mut action = self.action(project_id, action_id)?;
        action.channel = channel.unwrap_or(action.channel);
        action.channel_detail = detail.unwrap_or(action.channel_detail);
        self.check_channel(&action.channel, &action.channel_detail)
            .await?;
        let action = self.platform.store().save_action(action).await?;
        self.run_action(action.clone());
        Ok(action)
    }

    /// Deletes an action and its queue.
    pub async fn delete_action(
        &self,
        project_id: &str,
        action_id: &str,
    ) -> Result<(), EngineError> {
        self.action(project_id, action_id)?;
        self.stop_action(action_id);
        self.platform
            .store()
            .delete_action(action_id.to_owned())
            .await?;
        Ok(())
    }

    /// An action's counters and queue depth (ioda extension).
    pub async fn action_status(
        &self,
        project_id: &str,
        action_id: &str,
    ) -> Result<Value, EngineError> {
        self.action(project_id, action_id)?;
        let (stats, source) = read(&self.actions)
            .get(action_id)
            .map(|a| (a.stats.snapshot(), a.source.clone()))
            .unwrap_or((Value::Null, Source::Table));
        let mut status = stats;
        match source {
            Source::Reports(queue) => {
                let (messages, bytes, spill_from) = queue.depth();
                status["queued_messages"] = messages.into();
                status["queued_bytes"] = bytes.into();
                // Reports beyond memory wait in the stored history (an upper bound: the rule may
                // let some pass).
                let in_log = match spill_from {
                    Some(from) => self.platform.store().logged_count_after(from - 1).await?,
                    None => 0,
                };
                status["reports_in_history"] = in_log.into();
            }
            Source::Table => {
                let depth = self
                    .platform
                    .store()
                    .queue_depth(action_id.to_owned())
                    .await?;
                status["queued_messages"] = depth.messages.into();
                status["queued_bytes"] = depth.bytes.into();
            }
        }
        // Events the dispatcher missed by falling behind the bus (device data is never among them:
        // it is staged in its own transaction).
        status["events_lost_by_dispatcher"] = self
            .lost_events
            .load(std::sync::atomic::Ordering::Relaxed)
            .into();
        Ok(status)
    }
}

/// A legacy subscription: a notify type pushed to a callback URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub subscription_id: String,
    pub notify_type: String,
    pub callback_url: String,
    pub app_id: Option<String>,
}

impl Forwarder {
    /// Creates a legacy subscription: stored as a rule with its HTTP action, so it shares the
    /// durable queues, retries and trace of data forwarding.
    pub async fn subscribe(
        self: &Arc<Self>,
        project_id: &str,
        notify_type: &str,
        callback_url: &str,
        app_id: Option<String>,
    ) -> Result<Subscription, EngineError> {
        if !crate::legacy::NOTIFY_TYPES.contains(&notify_type) {
            return Err(invalid(format!(
                "notifyType must be one of {}",
                crate::legacy::NOTIFY_TYPES.join(", ")
            )));
        }
        crate::legacy::check_callback_url(callback_url).map_err(invalid)?;
        let now = self.platform.now();
        let rule = RoutingRule {
            seq: 0,
            rule_id: new_id(now),
            project_id: project_id.to_owned(),
            rule_name: Some(format!("legacy {notify_type}")),
            description: None,
            resource: LEGACY_RESOURCE.to_owned(),
            event: notify_type.to_owned(),
            app_type: "GLOBAL".to_owned(),
            app_id: app_id.clone(),
            select: None,
            condition: None,
            active: true,
            created_at: now,
        };
        let rule = self.platform.store().save_rule(rule).await?;
        let action = RoutingAction {
            seq: 0,
            action_id: new_id(now),
            project_id: project_id.to_owned(),
            rule_id: rule.rule_id.clone(),
            channel: "HTTP_FORWARDING".to_owned(),
            channel_detail: serde_json::json!({ "http_forwarding": { "url": callback_url } }),
            created_at: now,
        };
        let action = self.platform.store().save_action(action).await?;
        self.run_action(action);
        self.refresh_rule(rule.clone());
        Ok(Subscription {
            subscription_id: rule.rule_id,
            notify_type: notify_type.to_owned(),
            callback_url: callback_url.to_owned(),
            app_id,
        })
    }

    /// The project's legacy subscriptions, newest first.
    pub fn subscriptions(&self, project_id: &str) -> Vec<Subscription> {
        let rules = read(&self.rules);
        let actions = read(&self.actions);
        let mut found: Vec<(i64, Subscription)> = rules
            .iter()
            .filter(|r| r.rule.project_id == project_id && r.rule.resource == LEGACY_RESOURCE)
            .map(|r| {
                let url = actions
                    .values()
                    .find(|a| a.action.rule_id == r.rule.rule_id)
                    .and_then(|a| {
                        a.action
                            .channel_detail
                            .pointer("/http_forwarding/url")
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    })
                    .unwrap_or_default();
                let subscription = Subscription {
                    subscription_id: r.rule.rule_id.clone(),
                    notify_type: r.rule.event.clone(),
                    callback_url: url,
                    app_id: r.rule.app_id.clone(),
                };
                (r.rule.seq, subscription)
            })
            .collect();
        found.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        found.into_iter().map(|(_, s)| s).collect()
    }

    /// Deletes a legacy subscription.
    pub async fn unsubscribe(
        &self,
        project_id: &str,
        subscription_id: &str,
    ) -> Result<(), EngineError> {
        let exists = self
            .subscriptions(project_id)
            .iter()
            .any(|s| s.subscription_id == subscription_id);
        if !exists {
            return Err(EngineError::NotFound("subscription"));
        }
        self.remove_rule_with_actions(subscription_id).await
    }
}
