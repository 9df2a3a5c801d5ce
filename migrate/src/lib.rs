//! Brings the database's schema up to date and, with `--roles`, gives each
//! binary its least-privilege role (`runtime::db::roles`). Run it as the
//! database's owner before the binaries start; they then connect as their
//! roles, which may check the schema but not change it.

use anyhow::Context;
use runtime::db::roles::{DatabaseRole, roles};
use settings::{Source, Var};

/// The default prefix of the roles' names (`orderflow_order_worker`).
pub const ROLE_PREFIX: &str = "orderflow_";

#[derive(Debug, clap::Parser)]
#[command(
    name = "migrate",
    version,
    about = "Applies the database's migrations and, with --roles, gives each binary its least-privilege role"
)]
pub struct Cli {
    /// Also create or update one role per binary with exactly the rights it
    /// needs, each password from DATABASE_PASSWORD_<BINARY> (at least 16
    /// characters), e.g. DATABASE_PASSWORD_ORDER_WORKER.
    #[arg(long)]
    pub roles: bool,
    /// The prefix of the roles' names: letters, digits and `_`.
    #[arg(long, default_value = ROLE_PREFIX, requires = "roles")]
    pub role_prefix: String,
}

/// Applies the migrations with `DATABASE_URL` (the owner's), then the roles.
/// Every password is read before anything changes.
pub async fn run(cli: Cli, source: &Source) -> anyhow::Result<()> {
    let url = runtime::config::database_url(source)?;
    let passwords = if cli.roles {
        check_prefix(&cli.role_prefix)?;
        role_passwords(source)?
    } else {
        Vec::new()
    };
    let pool = runtime::db::connect_when_reachable(url.expose(), 1, "migrate").await?;
    runtime::db::migrate(&pool).await?;
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await?;
    println!("migrations applied on database {database:?}");
    let mut connection = pool.acquire().await?;
    for (role, password) in &passwords {
        let name = role.name(&cli.role_prefix);
        role.apply(&mut connection, &cli.role_prefix, password)
            .await
            .with_context(|| format!("cannot set role {name} (DATABASE_URL must be the database owner's, with CREATEROLE)"))?;
        println!(
            "role {name} set on database {database:?} for {}",
            role.binary
        );
    }
    drop(connection);
    pool.close().await;
    Ok(())
}

fn check_prefix(prefix: &str) -> anyhow::Result<()> {
    if prefix
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        Ok(())
    } else {
        anyhow::bail!("--role-prefix {prefix:?}: use lowercase letters, digits and '_'")
    }
}

/// Each role with its password (`DATABASE_PASSWORD_<BINARY>`), or the
/// first one missing, named.
fn role_passwords(source: &Source) -> anyhow::Result<Vec<(DatabaseRole, String)>> {
    roles()
        .into_iter()
        .map(|role| {
            let password = source.password(
                Var::optional(role.password_var),
                "migrate --roles needs a password for each binary's role",
            )?;
            Ok((role, password))
        })
        .collect()
}
