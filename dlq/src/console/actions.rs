//! The console's changes: replay, edit-and-replay, purge and restore, each
//! posted twice, first as a dry run that shows what it would do, then with
//! `confirm=yes` to act, as the signed-in operator.

use super::{Failure, Shared, known_dead_queue, pages};
use crate::{Outcome, ReplayOptions, Selectors};
use axum::extract::{Form, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use publisher::auth::Caller;
use serde::Deserialize;

/// Which messages a form acts on: ids, or a group; and whether the
/// operator confirmed.
#[derive(Deserialize, Default)]
pub(super) struct ActionForm {
    /// Message ids, one per line or comma-separated.
    #[serde(default)]
    ids: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    message_type: String,
    #[serde(default)]
    error: String,
    /// A corrected body (replay of one message).
    #[serde(default)]
    body: Option<String>,
    /// Why, for a purge.
    #[serde(default)]
    reason: String,
    #[serde(default)]
    confirm: String,
}

impl ActionForm {
    fn selectors(&self) -> Result<Selectors, Failure> {
        let ids: Vec<String> = self
            .ids
            .split([',', '\n', ' '])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let selectors = Selectors {
            ids,
            message_type: nonempty(&self.message_type),
            error_contains: nonempty(&self.error),
            kind: nonempty(&self.kind),
            ..Selectors::default()
        };
        if selectors.is_empty() {
            return Err(Failure::new(
                StatusCode::BAD_REQUEST,
                "choose the messages: by id, or a group",
            ));
        }
        Ok(selectors)
    }

    fn confirmed(&self) -> bool {
        self.confirm == "yes"
    }

    /// The fields to carry into the confirmation form.
    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("ids", self.ids.clone()),
            ("kind", self.kind.clone()),
            ("message_type", self.message_type.clone()),
            ("error", self.error.clone()),
            ("reason", self.reason.clone()),
        ];
        if let Some(body) = &self.body {
            fields.push(("body", body.clone()));
        }
        fields
    }
}

pub(super) async fn replay(
    State(console): State<Shared>,
    Path(queue): Path<String>,
    axum::Extension(caller): axum::Extension<Caller>,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    let (queue, domain) = known_dead_queue(&queue)?;
    let selectors = form.selectors()?;
    let options = ReplayOptions {
        dry_run: !form.confirmed(),
        rate: None,
        to_queue: None,
        new_body: form.body.as_ref().map(|b| b.clone().into_bytes()),
        max_replays: console.max_replays,
        force: false,
        inbox_retention: console.inbox_retention,
    };
    let dlq = console.dlq.acting_as(&caller.name);
    let outcomes = dlq
        .replay(&queue, domain, &selectors, &options, &())
        .await?;
    Ok(done_or_confirm(&queue, "replay", &form, &outcomes))
}

pub(super) async fn purge(
    State(console): State<Shared>,
    Path(queue): Path<String>,
    axum::Extension(caller): axum::Extension<Caller>,
    Form(form): Form<ActionForm>,
) -> Result<Response, Failure> {
    let (queue, _) = known_dead_queue(&queue)?;
    let selectors = form.selectors()?;
    let reason = (!form.reason.trim().is_empty()).then(|| form.reason.trim().to_owned());
    let dlq = console.dlq.acting_as(&caller.name);
    let outcomes = dlq
        .purge(
            &queue,
            &selectors,
            reason.as_deref(),
            !form.confirmed(),
            |_| true,
        )
        .await?;
    Ok(done_or_confirm(&queue, "purge", &form, &outcomes))
}

/// The confirmation page of a dry run, or the outcome of a confirmed one.
fn done_or_confirm(queue: &str, action: &str, form: &ActionForm, outcomes: &[Outcome]) -> Response {
    if form.confirmed() {
        pages::outcomes(queue, action, outcomes).into_response()
    } else {
        pages::confirm(queue, action, &form.fields(), outcomes).into_response()
    }
}

#[derive(Deserialize)]
pub(super) struct RestoreForm {
    queue: String,
    message_id: String,
    #[serde(default)]
    confirm: String,
}

pub(super) async fn restore(
    State(console): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    Form(form): Form<RestoreForm>,
) -> Result<Response, Failure> {
    let (queue, _) = known_dead_queue(&form.queue)?;
    if form.confirm != "yes" {
        let fields = vec![
            ("queue", queue.clone()),
            ("message_id", form.message_id.clone()),
        ];
        let would = [Outcome {
            message_id: form.message_id.clone(),
            action: "would restore",
            detail: format!("back into {queue}"),
        }];
        return Ok(
            pages::confirm_at("/archive/restore", &queue, "restore", &fields, &would)
                .into_response(),
        );
    }
    let dlq = console.dlq.acting_as(&caller.name);
    let outcomes = dlq
        .restore(&queue, std::slice::from_ref(&form.message_id), false)
        .await?;
    Ok(pages::outcomes(&queue, "restore", &outcomes).into_response())
}
