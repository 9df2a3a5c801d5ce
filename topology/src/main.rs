//! `topology`: declare, export or diff the contract broker topology.

use anyhow::Context;
use clap::{Parser, Subcommand};
use settings::Source;
use std::process::ExitCode;
use std::time::Duration;
use topology::addresses::{AMQP_URL, amqp_url};
use topology::management::RABBITMQ_MANAGEMENT_URL;
use topology::retry::RETRY_DELAYS;
use topology::{BrokerAddresses, Management, RetryDelays, Topology};

/// How long `apply` waits for each node to accept its connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(version, about = "The orderflow broker topology: apply, export, diff")]
struct Cli {
    /// The broker, or the nodes of a cluster (`amqp://user:password@rabbit-1,rabbit-2/vhost`);
    /// its path is the vhost. Overrides AMQP_URL [default: amqp://guest:guest@127.0.0.1:5672/%2f].
    #[arg(long)]
    amqp_url: Option<String>,
    /// The retry tiers of every work queue. Overrides RETRY_DELAYS [default: 1s,5s,30s,2m,10m].
    #[arg(long)]
    retry_delays: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Declare every exchange, queue and binding (idempotent).
    Apply {
        /// Also create one broker user per binary (publisher, each worker,
        /// dlq) with the least permissions it needs on the vhost, through
        /// the management API; each password from AMQP_PASSWORD_<BINARY>
        /// (AMQP_PASSWORD_PUBLISHER, AMQP_PASSWORD_ORDER_WORKER, …).
        #[arg(long)]
        users: bool,
        /// Put before each user's name (one broker serving several deployments).
        #[arg(long, default_value = "", requires = "users")]
        user_prefix: String,
        /// The management API for --users; overrides RABBITMQ_MANAGEMENT_URL.
        #[arg(long)]
        management_url: Option<String>,
    },
    /// Print a RabbitMQ definitions document (management UI import, `load_definitions`).
    Export {
        /// The vhost named in the document; defaults to the vhost of AMQP_URL.
        #[arg(long)]
        vhost: Option<String>,
        /// Also define this user (`NAME:PASSWORD`) with full rights on the vhost,
        /// for brokers that load the document at start and so skip the default user.
        #[arg(long)]
        user: Option<String>,
        /// Also define one least-privilege user per binary, as `apply --users`
        /// does, each password from AMQP_PASSWORD_<BINARY> (stored hashed).
        #[arg(long)]
        users: bool,
        /// Put before each binary's user name.
        #[arg(long, default_value = "", requires = "users")]
        user_prefix: String,
    },
    /// Compare the live broker with the declared topology; exit 1 on any drift.
    Diff {
        /// The management API; overrides RABBITMQ_MANAGEMENT_URL. Unset, port
        /// 15672 on the broker's host (the first node of a cluster's that answers).
        #[arg(long)]
        management_url: Option<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("topology: {}", topology::report::describe(&e));
            ExitCode::from(2)
        }
    }
}

/// What `topology` reads: its flags laid over the environment, read like
/// every binary's settings.
struct Settings {
    amqp_url: String,
    retry_delays: RetryDelays,
    management_url: Option<String>,
}

impl Settings {
    fn read(source: &Source) -> anyhow::Result<Self> {
        Ok(Self {
            amqp_url: amqp_url(source)?.expose().to_owned(),
            retry_delays: source.get(RETRY_DELAYS)?,
            management_url: source.optional(RABBITMQ_MANAGEMENT_URL, |raw| Ok(raw.to_owned()))?,
        })
    }
}

/// Each identity with its password (`AMQP_PASSWORD_<BINARY>`, at least 16
/// characters), or the first one missing, named.
fn identity_passwords(
    source: &Source,
) -> anyhow::Result<Vec<(topology::identities::Identity, String)>> {
    topology::identities::identities()
        .into_iter()
        .map(|identity| {
            let password = source.password(
                settings::Var::optional(identity.password_var),
                "topology apply --users needs a password for each binary's user",
            )?;
            Ok((identity, password))
        })
        .collect()
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let management_url = match &cli.command {
        Command::Diff { management_url } | Command::Apply { management_url, .. } => {
            management_url.clone()
        }
        Command::Export { .. } => None,
    };
    let source = Source::environment()
        .with(AMQP_URL, cli.amqp_url)
        .with(RETRY_DELAYS, cli.retry_delays)
        .with(RABBITMQ_MANAGEMENT_URL, management_url);
    let cli_settings = Settings::read(&source)?;
    let declared = Topology::contract(&cli_settings.retry_delays);
    let amqp_url = &cli_settings.amqp_url;
    match cli.command {
        Command::Apply {
            users, user_prefix, ..
        } => {
            // Every password is read before anything changes on the broker.
            let passwords = if users {
                identity_passwords(&source)?
            } else {
                Vec::new()
            };
            let addresses =
                BrokerAddresses::parse(amqp_url).context("AMQP_URL is not an AMQP URL")?;
            let connection = addresses
                .connect("topology", None, CONNECT_TIMEOUT)
                .await
                .context("cannot connect to the broker at AMQP_URL")?;
            let mismatches = topology::declare(&connection, &declared).await?;
            for m in &mismatches {
                eprintln!("topology: {m}");
            }
            if !mismatches.is_empty() {
                return Ok(ExitCode::from(1));
            }
            println!(
                "declared {} exchanges, {} queues, {} bindings",
                declared.exchanges.len(),
                declared.queues.len(),
                declared.bindings.len()
            );
            if users {
                let management_url = cli_settings.management_url.as_deref();
                let (api, vhost) =
                    Management::reachable_for_amqp_url(amqp_url, management_url).await?;
                for (identity, password) in &passwords {
                    identity
                        .apply(&api, &vhost, &user_prefix, password)
                        .await
                        .with_context(|| {
                            format!("cannot set up the user of {}", identity.binary)
                        })?;
                    println!(
                        "user {user_prefix}{} set on vhost {vhost:?}",
                        identity.binary
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export {
            vhost,
            user,
            users,
            user_prefix,
        } => {
            let vhost = match vhost {
                Some(v) => v,
                None => topology::management::Management::for_amqp_url(amqp_url, None)?.1,
            };
            let mut doc = declared.definitions(&vhost);
            if let Some(user) = user {
                let (name, password) =
                    user.split_once(':').context("--user takes NAME:PASSWORD")?;
                topology::model::add_user(&mut doc, &vhost, name, password);
            }
            if users {
                for (identity, password) in identity_passwords(&source)? {
                    identity.add_to_definitions(&mut doc, &vhost, &user_prefix, &password);
                }
            }
            println!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff { .. } => {
            let management_url = cli_settings.management_url.as_deref();
            let (api, vhost) = Management::reachable_for_amqp_url(amqp_url, management_url).await?;
            let drift = topology::diff(&api, &vhost, &declared).await?;
            if drift.is_empty() {
                println!("no drift: vhost {vhost:?} matches the declared topology");
                return Ok(ExitCode::SUCCESS);
            }
            for d in &drift {
                println!("{d}");
            }
            println!("{} difference(s)", drift.len());
            Ok(ExitCode::from(1))
        }
    }
}
