//! The console's pages, rendered on the server (maud escapes every value):
//! plain links, forms and buttons, so that a keyboard reaches everything and
//! a phone reads it, with no script and nothing from another site.

use super::{ArchivedRow, AuditRow, Group, QueueRow, QueueView};
use crate::Outcome;
use axum::http::StatusCode;
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

fn layout(title: &str, signed_in: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · orderflow console" }
                link rel="stylesheet" href="/console.css";
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    nav aria-label="Console" {
                        a.brand href="/" { "orderflow console" }
                        @if signed_in {
                            a href="/" { "Dead queues" }
                            a href="/archive" { "Archive" }
                            a href="/audit" { "Audit trail" }
                            form.inline method="post" action="/logout" {
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main #main { (body) }
            }
        }
    }
}

/// `raw` as one URL path segment or query value: a message id is whatever
/// its producer chose.
fn encoded(raw: &str) -> String {
    url::form_urlencoded::byte_serialize(raw.as_bytes()).collect()
}

fn age(seconds: Option<i64>) -> String {
    match seconds {
        None => "—".to_owned(),
        Some(s) if s < 120 => format!("{s} s"),
        Some(s) if s < 7200 => format!("{} min", s / 60),
        Some(s) if s < 172_800 => format!("{} h", s / 3600),
        Some(s) => format!("{} days", s / 86_400),
    }
}

pub fn login(refused: Option<&str>) -> Markup {
    layout(
        "Sign in",
        false,
        html! {
            h1 { "Sign in" }
            p { "Paste an API key or a JWT with the " code { "admin" } " role." }
            @if let Some(why) = refused {
                p.error role="alert" { (why) }
            }
            form method="post" action="/login" {
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="off" required autofocus;
                button type="submit" { "Sign in" }
            }
        },
    )
}

pub fn failure(status: StatusCode, message: &str) -> Markup {
    layout(
        "Error",
        true,
        html! {
            h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
            p.error role="alert" { (message) }
            p { a href="/" { "Back to the dead queues" } }
        },
    )
}

pub fn queues(rows: &[QueueRow]) -> Markup {
    layout(
        "Dead queues",
        true,
        html! {
            h1 { "Dead queues" }
            div.scroll {
                table {
                    thead { tr { th { "Queue" } th.num { "Messages" } th { "Oldest died" } } }
                    tbody {
                        @for row in rows {
                            tr {
                                td { a href={ "/queues/" (row.queue) } { (row.queue) } }
                                td.num { (row.depth) }
                                td { (age(row.oldest_age_seconds)) @if row.oldest_age_seconds.is_some() { " ago" } }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// A hidden-field form that acts on a group or on ids.
fn action_form(queue: &str, action: &str, label: &str, fields: &[(&str, &str)]) -> Markup {
    html! {
        form.inline method="post" action={ "/queues/" (queue) "/" (action) } {
            @for (name, value) in fields {
                input type="hidden" name=(name) value=(value);
            }
            button type="submit" { (label) }
        }
    }
}

pub(super) fn queue(view: &QueueView) -> Markup {
    let queue = view.queue.as_str();
    layout(
        queue,
        true,
        html! {
            h1 { (queue) }
            p {
                (view.depth) " message(s) in the queue"
                @if (view.sampled as u32) < view.depth {
                    "; grouped below: the first " (view.sampled)
                }
                "."
            }
            h2 { "Why they died" }
            @if view.groups.is_empty() {
                p { "Nothing is dead here." }
            } @else {
                div.scroll {
                    table {
                        thead { tr { th.num { "Count" } th { "Kind" } th { "Type" } th { "Error" } th { "Act on the group" } } }
                        tbody {
                            @for g in &view.groups {
                                (group_row(queue, g))
                            }
                        }
                    }
                }
            }
            h2 { "Messages" }
            @if view.after.is_some() {
                p { a href={ "/queues/" (queue) } { "← First page" } }
            }
            div.scroll {
                table {
                    thead { tr { th { "Message" } th { "Type" } th { "Order" } th { "Kind" } th { "Error" } th { "Died" } } }
                    tbody {
                        @for m in &view.messages {
                            @let id = m["message_id"].as_str().unwrap_or_default();
                            tr {
                                td { a href={ "/queues/" (queue) "/messages/" (encoded(id)) } { code { (id) } } }
                                td { (m["type"].as_str().unwrap_or_default()) }
                                td { code { (m["order_id"].as_str().unwrap_or_default()) } }
                                td { (m["error_kind"].as_str().unwrap_or_default()) }
                                td.error-text { (m["error"].as_str().unwrap_or_default()) }
                                td { (age(m["age_seconds"].as_i64())) " ago" }
                            }
                        }
                    }
                }
            }
            @if let Some(next) = &view.next {
                p { a href={ "/queues/" (queue) "?after=" (encoded(next)) } { "Next page →" } }
            }
        },
    )
}

fn group_row(queue: &str, g: &Group) -> Markup {
    let fields = [
        ("kind", g.kind.as_str()),
        ("message_type", g.message_type.as_str()),
        ("error", g.error.as_str()),
    ];
    html! {
        tr {
            td.num { (g.count) }
            td { (g.kind) }
            td { (g.message_type) }
            td.error-text { (g.error) }
            td.actions {
                (action_form(queue, "replay", "Replay…", &fields))
                (action_form(queue, "purge", "Purge…", &fields))
            }
        }
    }
}

pub fn message(queue: &str, summary: &Value, details: &Value) -> Markup {
    let id = summary["message_id"].as_str().unwrap_or_default();
    let body = match &details["body"] {
        Value::String(text) if details["body_is_json"] == false => text.clone(),
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    };
    let properties = serde_json::to_string_pretty(&details["properties"]).unwrap_or_default();
    let id_field = [("ids", id)];
    html! {
        (layout(id, true, html! {
            p { a href={ "/queues/" (queue) } { "← " (queue) } }
            h1 { "Message " code { (id) } }
            dl {
                dt { "Type" } dd { (summary["type"].as_str().unwrap_or_default()) }
                dt { "Order" } dd { code { (summary["order_id"].as_str().unwrap_or_default()) } }
                dt { "Why it died" } dd.error-text { (summary["error_kind"].as_str().unwrap_or_default()) ": " (summary["error"].as_str().unwrap_or_default()) }
                dt { "Attempts" } dd { (summary["attempts"]) }
                dt { "Replays so far" } dd { (summary["replays"]) }
                dt { "Died" } dd { (summary["first_failed_at"].as_str().unwrap_or("—")) }
                dt { "Went to" } dd { (summary["original_exchange"].as_str().unwrap_or("—")) " / " (summary["original_routing_key"].as_str().unwrap_or("—")) }
            }
            div.actions {
                (action_form(queue, "replay", "Replay…", &id_field))
                (action_form(queue, "purge", "Purge…", &id_field))
            }
            h2 { "Body" }
            pre { (body) }
            h2 { "Edit and replay" }
            form method="post" action={ "/queues/" (queue) "/replay" } {
                input type="hidden" name="ids" value=(id);
                label for="body" { "Corrected body" }
                textarea #body name="body" rows="10" spellcheck="false" { (body) }
                button type="submit" { "Replay with this body…" }
            }
            h2 { "Properties and headers (with x-death)" }
            pre { (properties) }
        }))
    }
}

fn outcome_table(outcomes: &[Outcome]) -> Markup {
    html! {
        div.scroll {
            table {
                thead { tr { th { "Message" } th { "Outcome" } th { "Detail" } } }
                tbody {
                    @for o in outcomes {
                        tr { td { code { (o.message_id) } } td { (o.action) } td { (o.detail) } }
                    }
                }
            }
        }
    }
}

pub fn confirm(
    queue: &str,
    action: &str,
    fields: &[(&'static str, String)],
    would: &[Outcome],
) -> Markup {
    confirm_at(
        &format!("/queues/{queue}/{action}"),
        queue,
        action,
        fields,
        would,
    )
}

pub fn confirm_at(
    target: &str,
    queue: &str,
    action: &str,
    fields: &[(&'static str, String)],
    would: &[Outcome],
) -> Markup {
    let acting = would
        .iter()
        .filter(|o| o.action.starts_with("would"))
        .count();
    layout(
        "Confirm",
        true,
        html! {
            h1 { "Confirm: " (action) }
            @if acting == 0 {
                p.error role="alert" { "Nothing to " (action) ": see why below." }
            } @else {
                p { "This will " (action) " " strong { (acting) " message(s)" } " of " (queue) "." }
            }
            (outcome_table(would))
            @if acting > 0 {
                form method="post" action=(target) {
                    @for (name, value) in fields {
                        input type="hidden" name=(name) value=(value);
                    }
                    @if *action == *"purge" {
                        label for="reason" { "Reason (kept in the archive and the audit trail)" }
                        input #reason type="text" name="reason" value=(fields.iter().find(|(n, _)| *n == "reason").map(|(_, v)| v.as_str()).unwrap_or(""));
                    }
                    input type="hidden" name="confirm" value="yes";
                    button.primary type="submit" autofocus { "Yes, " (action) " " (acting) }
                }
            }
            p { a href={ "/queues/" (queue) } { "Cancel" } }
        },
    )
}

pub fn outcomes(queue: &str, action: &str, outcomes: &[Outcome]) -> Markup {
    layout(
        "Done",
        true,
        html! {
            h1 { "Done: " (action) }
            (outcome_table(outcomes))
            p { a href={ "/queues/" (queue) } { "Back to " (queue) } " · " a href="/audit" { "Audit trail" } }
        },
    )
}

pub(super) fn archive(rows: &[ArchivedRow]) -> Markup {
    layout(
        "Archive",
        true,
        html! {
            h1 { "Archive" }
            p { "Purged messages, kept whole; restoring one puts it back into its dead queue exactly as it was." }
            div.scroll {
                table {
                    thead { tr { th { "Purged" } th { "Queue" } th { "Message" } th { "By" } th { "Reason" } th { "" } } }
                    tbody {
                        @for r in rows {
                            @let id = r.message_id.clone().unwrap_or_default();
                            tr {
                                td { (r.purged_at.format("%Y-%m-%d %H:%M:%S")) }
                                td { (r.queue) }
                                td { code { (id) } }
                                td { (r.purged_by) }
                                td { (r.reason.as_deref().unwrap_or("")) }
                                td {
                                    form.inline method="post" action="/archive/restore" {
                                        input type="hidden" name="queue" value=(r.queue);
                                        input type="hidden" name="message_id" value=(id);
                                        button type="submit" { "Restore…" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

pub(super) fn audit(rows: &[AuditRow]) -> Markup {
    layout(
        "Audit trail",
        true,
        html! {
            h1 { "Audit trail" }
            div.scroll {
                table {
                    thead { tr { th { "When" } th { "Operator" } th { "Action" } th { "Queue" } th { "Message" } th { "Detail" } } }
                    tbody {
                        @for r in rows {
                            tr {
                                td { (r.at.format("%Y-%m-%d %H:%M:%S")) }
                                td { (r.operator) }
                                td { (r.action) }
                                td { (r.queue) }
                                td { code { (r.message_id.as_deref().unwrap_or("")) } }
                                td { code { (r.detail) } }
                            }
                        }
                    }
                }
            }
        },
    )
}
