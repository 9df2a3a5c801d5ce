//! The command line of `dlq`: argument parsing and output, human or `--json`.

use crate::{
    DEFAULT_MAX_REPLAYS, Dlq, GroupBy, Outcome, Progress, ReplayOptions, Selectors, Snapshot,
    dead_queue, group, parse_age,
};
use anyhow::{Context as _, bail};
use chrono::Utc;
use clap::{Parser, Subcommand};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use runtime::config::{self, ConfigError, SecretUrl, Source, Var};
use serde_json::json;
use std::io::{BufRead, IsTerminal, Write};

#[derive(Parser)]
#[command(
    version,
    about = "See why messages died, replay them safely, or purge them (archived)"
)]
pub struct Cli {
    /// The broker; overrides AMQP_URL.
    #[arg(long)]
    amqp_url: Option<String>,
    /// The database of the workers' inboxes and of the archive; overrides DATABASE_URL.
    #[arg(long)]
    database_url: Option<String>,
    /// Who is acting, for the audit table; overrides USER.
    #[arg(long)]
    operator: Option<String>,
    /// Machine-readable output, no progress bar.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List dead messages (the queue is left exactly as it was).
    List {
        queue: String,
        #[arg(long, value_enum, conflicts_with = "limit")]
        group_by: Option<GroupByArg>,
        #[command(flatten)]
        select: SelectorArgs,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one message: properties, headers (with x-death) and body.
    Show { queue: String, id: String },
    /// Publish messages back to where they came from.
    Replay(ReplayArgs),
    /// Remove messages, archiving each in PostgreSQL first.
    Purge {
        queue: String,
        #[command(flatten)]
        select: SelectorArgs,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        dry_run: bool,
        /// Why, for the archive and the audit.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Put purged messages back into their dead queue.
    Restore {
        queue: String,
        #[arg(long = "id")]
        ids: Vec<String>,
        #[arg(long)]
        all: bool,
    },
    /// Serve the failed-message console (a web page and a JSON API) until
    /// SIGTERM; callers sign in with an admin key or JWT (API_KEYS, JWT_*).
    Serve {
        /// Where to listen; overrides CONSOLE_ADDR.
        #[arg(long)]
        addr: Option<String>,
    },
}

/// `CONSOLE_ADDR`: where `dlq serve` listens.
const CONSOLE_ADDR: Var = Var::new("CONSOLE_ADDR", "127.0.0.1:8081");

/// The arguments of `dlq replay`.
#[derive(clap::Args)]
struct ReplayArgs {
    queue: String,
    #[command(flatten)]
    select: SelectorArgs,
    /// Print what would happen and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// At most this many messages per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Publish to this queue instead of the original exchange.
    #[arg(long)]
    to_queue: Option<String>,
    /// Edit the body in $EDITOR first (one message).
    #[arg(long)]
    edit: bool,
    /// Replace the body with this file's content first (one message).
    #[arg(long)]
    set_body: Option<std::path::PathBuf>,
    /// Refuse messages replayed this often already.
    #[arg(long, default_value_t = DEFAULT_MAX_REPLAYS)]
    max_replays: i64,
    /// Replay even when the consumer's inbox says it was applied.
    #[arg(long)]
    force: bool,
}

/// A page of a listing: memory flat in the queue's depth.
#[derive(Debug, Default, Clone, clap::Args)]
struct PageArgs {
    /// List a page of at most this many messages, and the cursor of the next.
    #[arg(long)]
    limit: Option<usize>,
    /// Start after this message id: the cursor a page printed.
    #[arg(long, requires = "limit")]
    after: Option<String>,
    /// Died at or after this: an RFC 3339 time, or an age (2h: two hours ago).
    #[arg(long, value_parser = parse_time, requires = "limit")]
    since: Option<chrono::DateTime<Utc>>,
    /// Died before this: an RFC 3339 time, or an age.
    #[arg(long, value_parser = parse_time, requires = "limit")]
    until: Option<chrono::DateTime<Utc>>,
}

/// An RFC 3339 time, or an age before now (`30m`, `2h`).
fn parse_time(raw: &str) -> Result<chrono::DateTime<Utc>, String> {
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(raw) {
        return Ok(time.with_timezone(&Utc));
    }
    let age = parse_age(raw)
        .map_err(|_| format!("{raw:?} is neither an RFC 3339 time nor an age such as 2h"))?;
    let age = chrono::Duration::from_std(age).map_err(|e| e.to_string())?;
    Ok(Utc::now() - age)
}

/// What `dlq` reads: its flags laid over the environment, read like every
/// binary's settings.
struct Settings {
    amqp_url: SecretUrl,
    database_url: SecretUrl,
    operator: String,
    inbox_retention: std::time::Duration,
}

/// `USER`: who is acting, for the audit table.
const OPERATOR: Var = Var::new("USER", "unknown");

impl Settings {
    fn read(source: &Source) -> Result<Self, ConfigError> {
        Ok(Self {
            amqp_url: config::amqp_url(source)?,
            database_url: config::database_url(source)?,
            operator: source.get(OPERATOR)?,
            inbox_retention: config::inbox_retention(source)?,
        })
    }
}

/// Which dead messages an operation applies to.
#[derive(Debug, Default, Clone, clap::Args)]
struct SelectorArgs {
    /// A message id (repeatable).
    #[arg(long = "id")]
    ids: Vec<String>,
    /// Message type, e.g. payment.charge.
    #[arg(long = "type")]
    message_type: Option<String>,
    /// Part of the error text.
    #[arg(long)]
    error_contains: Option<String>,
    /// Died longer ago than this (30s, 10m, 2h).
    #[arg(long, value_parser = parse_age)]
    older_than: Option<std::time::Duration>,
    /// Error kind: permanent, exhausted, malformed, delivery-limit.
    #[arg(long)]
    kind: Option<String>,
    /// Every message in the queue.
    #[arg(long)]
    all: bool,
}

impl From<SelectorArgs> for Selectors {
    fn from(a: SelectorArgs) -> Self {
        Self {
            ids: a.ids,
            message_type: a.message_type,
            error_contains: a.error_contains,
            older_than: a.older_than,
            kind: a.kind,
            all: a.all,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum GroupByArg {
    Error,
    Type,
    Kind,
}

impl From<GroupByArg> for GroupBy {
    fn from(g: GroupByArg) -> Self {
        match g {
            GroupByArg::Error => GroupBy::Error,
            GroupByArg::Type => GroupBy::Type,
            GroupByArg::Kind => GroupBy::Kind,
        }
    }
}

impl Progress for indicatif::ProgressBar {
    fn start(&self, total: usize) {
        self.set_length(total as u64);
    }

    fn advance(&self) {
        self.inc(1);
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<bool> {
    let addr = match &cli.command {
        Command::Serve { addr } => addr.clone(),
        _ => None,
    };
    let source = Source::environment()
        .with(config::AMQP_URL, cli.amqp_url)
        .with(config::DATABASE_URL, cli.database_url)
        .with(OPERATOR, cli.operator)
        .with(CONSOLE_ADDR, addr);
    let settings = Settings::read(&source)?;
    // The console's settings are read before anything is connected.
    let console = match cli.command {
        Command::Serve { .. } => Some((
            source.get::<String>(CONSOLE_ADDR)?,
            publisher::auth::AuthSettings::read(&source)?,
        )),
        _ => None,
    };
    let dlq = Dlq::connect(
        settings.amqp_url.expose(),
        settings.database_url.expose(),
        &settings.operator,
    )
    .await?;
    let json_out = cli.json;
    match cli.command {
        Command::List {
            queue,
            group_by,
            select,
            page,
        } => {
            let (queue, _) = dead_queue(&queue)?;
            match page.limit {
                Some(limit) => {
                    let request = crate::PageRequest {
                        limit,
                        after: page.after,
                        since: page.since,
                        until: page.until,
                    };
                    list_page(&dlq, &queue, &select.into(), &request, json_out).await?;
                }
                None => {
                    let group_by = group_by.map(GroupBy::from);
                    list(&dlq, &queue, &select.into(), group_by, json_out).await?;
                }
            }
        }
        Command::Show { queue, id } => show(&dlq, &queue, &id).await?,
        Command::Replay(args) => replay(&dlq, args, settings.inbox_retention, json_out).await?,
        Command::Purge {
            queue,
            select,
            yes,
            dry_run,
            reason,
        } => {
            let (queue, _) = dead_queue(&queue)?;
            let select = chosen_by(select)?;
            let confirm = |n: usize| {
                yes || confirmed(&format!(
                    "Purge {n} message(s) from {queue}? They are archived and can be restored."
                ))
            };
            let outcomes = dlq
                .purge(&queue, &select, reason.as_deref(), dry_run, confirm)
                .await?;
            report(&outcomes, json_out);
        }
        Command::Serve { .. } => {
            let Some((addr, auth)) = console else {
                unreachable!("read above for Serve");
            };
            serve(dlq, &addr, auth, settings.inbox_retention).await?;
        }
        Command::Restore { queue, ids, all } => {
            let (queue, _) = dead_queue(&queue)?;
            if ids.is_empty() && !all {
                bail!("name the messages to restore with --id, or --all");
            }
            let outcomes = dlq.restore(&queue, &ids, all).await?;
            report(&outcomes, json_out);
        }
    }
    Ok(true)
}

/// `dlq replay`: an edited or replaced body is bound to the id of the
/// message it was read from.
async fn replay(
    dlq: &Dlq,
    args: ReplayArgs,
    inbox_retention: std::time::Duration,
    json_out: bool,
) -> anyhow::Result<()> {
    let ReplayArgs {
        queue,
        select,
        dry_run,
        rate,
        to_queue,
        edit,
        set_body,
        max_replays,
        force,
    } = args;
    let (queue, domain) = dead_queue(&queue)?;
    let mut select = chosen_by(select)?;
    // A new body belongs to the message read now: whatever the
    // selectors match by the time it is replayed (another operator
    // may purge, replay or restore meanwhile), only that message,
    // by its id, may carry it.
    let new_body = match (set_body, edit) {
        (Some(path), _) => {
            let (id, _) = read_one(dlq, &queue, &select).await?;
            let body =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            Some((id, body))
        }
        (None, true) => Some(edit_body(dlq, &queue, &select).await?),
        (None, false) => None,
    };
    let new_body = new_body.map(|(id, body)| {
        select = Selectors {
            ids: vec![id],
            ..Selectors::default()
        };
        body
    });
    let options = ReplayOptions {
        dry_run,
        rate,
        to_queue,
        new_body,
        max_replays,
        force,
        inbox_retention,
    };
    let bar = progress(json_out);
    let outcomes = dlq.replay(&queue, domain, &select, &options, &bar).await?;
    bar.finish_and_clear();
    report(&outcomes, json_out);
    Ok(())
}

/// The selectors of an operation that changes the queue, which must choose
/// something explicitly.
fn chosen_by(select: SelectorArgs) -> anyhow::Result<Selectors> {
    let select = Selectors::from(select);
    if select.is_empty() {
        bail!("choose messages: --id, --type, --error-contains, --older-than, --kind or --all");
    }
    Ok(select)
}

/// Asks on the terminal; only `yes` agrees.
fn confirmed(question: &str) -> bool {
    eprint!("{question} Type yes: ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).is_ok() && answer.trim() == "yes"
}

/// A progress bar on a terminal, none for `--json` or a pipe.
fn progress(json_out: bool) -> indicatif::ProgressBar {
    if json_out || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    }
}

/// Lists the chosen messages of `queue`, or counts them by group; the
/// queue is left exactly as it was.
/// One page of a listing, and how to get the next.
async fn list_page(
    dlq: &Dlq,
    queue: &str,
    select: &Selectors,
    request: &crate::PageRequest,
    json_out: bool,
) -> anyhow::Result<()> {
    let page = crate::page(&dlq.connection, queue, select, request).await?;
    let shown: Vec<_> = page.messages.iter().collect();
    if json_out {
        let now = Utc::now();
        print_json(&json!({
            "messages": shown.iter().map(|m| m.summary(now)).collect::<Vec<_>>(),
            "next_cursor": page.next,
            "depth": page.depth,
            "scanned": page.scanned,
        }));
    } else {
        println!(
            "{}\n{} message(s) of the {} in {queue}",
            table_of(&shown),
            shown.len(),
            page.depth
        );
        if let Some(next) = &page.next {
            let mut command = format!("dlq list {queue} --limit {} --after {next}", request.limit);
            for (flag, time) in [("--since", request.since), ("--until", request.until)] {
                if let Some(time) = time {
                    command.push_str(&format!(" {flag} {}", time.to_rfc3339()));
                }
            }
            println!("next page: {command}");
        }
    }
    Ok(())
}

async fn list(
    dlq: &Dlq,
    queue: &str,
    select: &Selectors,
    group_by: Option<GroupBy>,
    json_out: bool,
) -> anyhow::Result<()> {
    let snapshot = Snapshot::take(&dlq.connection, queue).await?;
    let chosen = snapshot.chosen(select);
    match (group_by, json_out) {
        (Some(by), true) => {
            let groups: Vec<_> = group(&chosen, by)
                .into_iter()
                .map(|(k, n)| json!({"group": k, "count": n}))
                .collect();
            print_json(&groups);
        }
        (Some(by), false) => {
            let mut table = Table::new();
            table
                .load_preset(UTF8_BORDERS_ONLY)
                .set_header(vec!["count", "group"]);
            for (k, n) in group(&chosen, by) {
                table.add_row(vec![n.to_string(), k]);
            }
            println!("{table}\n{} message(s) in {queue}", chosen.len());
        }
        (None, true) => {
            let now = Utc::now();
            let list: Vec<_> = chosen.iter().map(|m| m.summary(now)).collect();
            print_json(&list);
        }
        (None, false) => {
            println!(
                "{}\n{} message(s) in {queue}",
                table_of(&chosen),
                chosen.len()
            );
        }
    }
    // Nothing was acked: every message goes back to its place.
    snapshot.release().await;
    Ok(())
}

/// One row per message, the error cut to 60 characters.
fn table_of(chosen: &[&crate::message::DeadMessage]) -> Table {
    let now = Utc::now();
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY).set_header(vec![
        "message id",
        "type",
        "order id",
        "kind",
        "error",
        "attempts",
        "first failed",
        "age",
    ]);
    for m in chosen {
        let error: String = m.error.chars().take(60).collect();
        table.add_row(vec![
            m.message_id.clone(),
            m.kind.clone(),
            m.correlation_id.clone(),
            m.error_kind.clone(),
            error,
            m.attempts.map(|a| a.to_string()).unwrap_or_default(),
            m.first_failed_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default(),
            m.age(now).map(human_age).unwrap_or_default(),
        ]);
    }
    table
}

/// Prints one message: properties, headers and body.
async fn show(dlq: &Dlq, queue: &str, id: &str) -> anyhow::Result<()> {
    let (queue, _) = dead_queue(queue)?;
    let found = crate::find(&dlq.connection, &queue, id).await?;
    let details = found
        .with_context(|| format!("no message {id} in {queue}"))?
        .details();
    print_json(&details);
    Ok(())
}

fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// The id and body of the one message `select` chooses in `queue`.
async fn read_one(dlq: &Dlq, queue: &str, select: &Selectors) -> anyhow::Result<(String, Vec<u8>)> {
    let snapshot = Snapshot::take(&dlq.connection, queue).await?;
    let chosen = snapshot.chosen(select);
    let one = match chosen.as_slice() {
        [one] => (one.message_id.clone(), one.body.clone()),
        other => {
            let n = other.len();
            snapshot.release().await;
            bail!("--edit and --set-body replay exactly one message; the selectors chose {n}");
        }
    };
    snapshot.release().await;
    Ok(one)
}

/// The id of the one message `select` chooses, and its body as edited in
/// `$EDITOR`.
async fn edit_body(
    dlq: &Dlq,
    queue: &str,
    select: &Selectors,
) -> anyhow::Result<(String, Vec<u8>)> {
    let (id, body) = read_one(dlq, queue, select).await?;
    let pretty = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| serde_json::to_vec_pretty(&v).ok())
        .unwrap_or(body);
    let path = std::env::temp_dir().join(format!("dlq-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&path, &pretty)?;
    let editor = std::env::var("EDITOR").unwrap_or_else(|_| "vi".into());
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("editor")
        .arg(&path)
        .status()
        .with_context(|| format!("cannot run EDITOR={editor}"))?;
    let edited = std::fs::read(&path)?;
    let _ = std::fs::remove_file(&path);
    if !status.success() {
        bail!("the editor exited with {status}; nothing replayed");
    }
    serde_json::from_slice::<serde_json::Value>(&edited)
        .context("the edited body is not valid JSON; nothing replayed")?;
    Ok((id, edited))
}

fn human_age(age: chrono::Duration) -> String {
    let s = age.num_seconds().max(0);
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn report(outcomes: &[Outcome], json_out: bool) {
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(outcomes).unwrap_or_default()
        );
        return;
    }
    for o in outcomes {
        println!("{:<13} {}  {}", o.action, o.message_id, o.detail);
    }
    if outcomes.iter().any(|o| o.action == "skipped") {
        println!(
            "(--force replays skipped messages anyway; --to-queue Q sends them to queue Q by name)"
        );
    }
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for o in outcomes {
        *counts.entry(o.action).or_default() += 1;
    }
    let summary: Vec<String> = counts.iter().map(|(a, n)| format!("{a}: {n}")).collect();
    println!(
        "{}",
        if summary.is_empty() {
            "nothing selected".to_owned()
        } else {
            summary.join(", ")
        }
    );
}

/// `dlq serve`: the console on `addr` until SIGTERM or Ctrl-C.
async fn serve(
    dlq: Dlq,
    addr: &str,
    auth: publisher::auth::AuthSettings,
    inbox_retention: std::time::Duration,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, auth = %auth.describe(), "Console listening");
    let console = crate::console::Console {
        dlq,
        authenticator: publisher::auth::Authenticator::start(auth).await?,
        inbox_retention,
        max_replays: DEFAULT_MAX_REPLAYS,
    };
    crate::console::serve(listener, console, runtime::shutdown::signal()).await
}
