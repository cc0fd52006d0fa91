//! Data forwarding API: `/routing-rule/rules` and `/routing-rule/actions`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ioda_rules::{NewRule, RulePatch};
use ioda_store::{RoutingAction, RoutingRule};
use ioda_types::ids;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{Body, Page, Query};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectDto {
    resource: String,
    event: String,
}

/// `AddRuleReq`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRuleReq {
    rule_name: Option<String>,
    description: Option<String>,
    subject: SubjectDto,
    app_type: Option<String>,
    app_id: Option<String>,
    select: Option<String>,
    #[serde(rename = "where")]
    condition: Option<String>,
}

/// `UpdateRuleReq`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRuleReq {
    rule_name: Option<String>,
    description: Option<String>,
    select: Option<String>,
    #[serde(rename = "where")]
    condition: Option<String>,
    active: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleQuery {
    resource: Option<String>,
    event: Option<String>,
    app_type: Option<String>,
    app_id: Option<String>,
    rule_name: Option<String>,
    active: Option<bool>,
    limit: Option<i64>,
    marker: Option<String>,
    offset: Option<i64>,
}

/// `AddActionReq`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddActionReq {
    rule_id: String,
    channel: String,
    channel_detail: Value,
}

/// `UpdateActionReq`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateActionReq {
    channel: Option<String>,
    channel_detail: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionQuery {
    rule_id: Option<String>,
    channel: Option<String>,
    app_type: Option<String>,
    app_id: Option<String>,
    limit: Option<i64>,
    marker: Option<String>,
    offset: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct RulePath {
    project_id: String,
    rule_id: String,
}

#[derive(Debug, Deserialize)]
pub struct ActionPath {
    project_id: String,
    action_id: String,
}

fn rule_view(r: &RoutingRule) -> Value {
    json!({
        "rule_id": r.rule_id,
        "rule_name": r.rule_name,
        "description": r.description,
        "subject": { "resource": r.resource, "event": r.event },
        "app_type": r.app_type,
        "app_id": r.app_id,
        "select": r.select,
        "where": r.condition,
        "active": r.active,
    })
}

fn action_view(a: &RoutingAction) -> Value {
    json!({
        "action_id": a.action_id,
        "rule_id": a.rule_id,
        "app_id": Value::Null,
        "channel": a.channel,
        "channel_detail": a.channel_detail,
    })
}

/// One page of a newest-first list, and the marker of its last item.
fn paginate<T>(items: Vec<T>, seq: impl Fn(&T) -> i64, page: Page) -> (Vec<T>, Option<String>) {
    let chosen: Vec<T> = items
        .into_iter()
        .filter(|i| seq(i) < page.before)
        .skip(page.offset as usize)
        .take(page.limit as usize)
        .collect();
    let marker = chosen.last().map(|i| ids::marker_of(seq(i)));
    (chosen, marker)
}

pub async fn create_rule(
    State(state): State<AppState>,
    Path(project_id): Path<String>,
    Body(body): Body<AddRuleReq>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let new = NewRule {
        rule_name: body.rule_name,
        description: body.description,
        resource: body.subject.resource,
        event: body.subject.event,
        app_type: body.app_type,
        app_id: body.app_id,
        select: body.select,
        condition: body.condition,
    };
    let rule = state.forwarder.create_rule(&project_id, new).await?;
    Ok((StatusCode::CREATED, Json(rule_view(&rule))))
}

pub async fn list_rules(
    State(state): State<AppState>,
    Path(project_id): Path<String>,
    Query(q): Query<RuleQuery>,
) -> Result<Json<Value>, ApiError> {
    let page = Page::from_params(q.limit, q.marker.as_deref(), q.offset)?;
    let rules = state.forwarder.rules(&project_id, |r| {
        q.resource.as_ref().is_none_or(|v| *v == r.resource)
            && q.event.as_ref().is_none_or(|v| *v == r.event)
            && q.app_type.as_ref().is_none_or(|v| *v == r.app_type)
            && q.app_id
                .as_ref()
                .is_none_or(|v| Some(v) == r.app_id.as_ref())
            && q.rule_name
                .as_ref()
                .is_none_or(|v| Some(v) == r.rule_name.as_ref())
            && q.active.is_none_or(|v| v == r.active)
    });
    let count = rules.len();
    let (rules, marker) = paginate(rules, |r| r.seq, page);
    let rules: Vec<Value> = rules.iter().map(rule_view).collect();
    Ok(Json(
        json!({ "rules": rules, "count": count, "marker": marker }),
    ))
}

pub async fn show_rule(
    State(state): State<AppState>,
    Path(path): Path<RulePath>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(rule_view(
        &state.forwarder.rule(&path.project_id, &path.rule_id)?,
    )))
}

pub async fn update_rule(
    State(state): State<AppState>,
    Path(path): Path<RulePath>,
    Body(body): Body<UpdateRuleReq>,
) -> Result<Json<Value>, ApiError> {
    let patch = RulePatch {
        rule_name: body.rule_name,
        description: body.description,
        select: body.select,
        condition: body.condition,
        active: body.active,
    };
    let rule = state
        .forwarder
        .update_rule(&path.project_id, &path.rule_id, patch)
        .await?;
    Ok(Json(rule_view(&rule)))
}

pub async fn delete_rule(
    State(state): State<AppState>,
    Path(path): Path<RulePath>,
) -> Result<StatusCode, ApiError> {
    state
        .forwarder
        .delete_rule(&path.project_id, &path.rule_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn create_action(
    State(state): State<AppState>,
    Path(project_id): Path<String>,
    Body(body): Body<AddActionReq>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let action = state
        .forwarder
        .create_action(
            &project_id,
            &body.rule_id,
            body.channel,
            body.channel_detail,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(action_view(&action))))
}

pub async fn list_actions(
    State(state): State<AppState>,
    Path(project_id): Path<String>,
    Query(q): Query<ActionQuery>,
) -> Result<Json<Value>, ApiError> {
    let page = Page::from_params(q.limit, q.marker.as_deref(), q.offset)?;
    let _ = (&q.app_type, &q.app_id);
    let actions = state.forwarder.actions(&project_id, |a| {
        q.rule_id.as_ref().is_none_or(|v| *v == a.rule_id)
            && q.channel.as_ref().is_none_or(|v| *v == a.channel)
    });
    let count = actions.len();
    let (actions, marker) = paginate(actions, |a| a.seq, page);
    let actions: Vec<Value> = actions.iter().map(action_view).collect();
    Ok(Json(
        json!({ "actions": actions, "count": count, "marker": marker }),
    ))
}

pub async fn show_action(
    State(state): State<AppState>,
    Path(path): Path<ActionPath>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(action_view(
        &state.forwarder.action(&path.project_id, &path.action_id)?,
    )))
}

pub async fn update_action(
    State(state): State<AppState>,
    Path(path): Path<ActionPath>,
    Body(body): Body<UpdateActionReq>,
) -> Result<Json<Value>, ApiError> {
    let action = state
        .forwarder
        .update_action(
            &path.project_id,
            &path.action_id,
            body.channel,
            body.channel_detail,
        )
        .await?;
    Ok(Json(action_view(&action)))
}

pub async fn delete_action(
    State(state): State<AppState>,
    Path(path): Path<ActionPath>,
) -> Result<StatusCode, ApiError> {
    state
        .forwarder
        .delete_action(&path.project_id, &path.action_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// ioda extension: what an action delivered, retried and dropped, and what waits in its queue.
pub async fn action_status(
    State(state): State<AppState>,
    Path(path): Path<ActionPath>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        state
            .forwarder
            .action_status(&path.project_id, &path.action_id)
            .await?,
    ))
}
