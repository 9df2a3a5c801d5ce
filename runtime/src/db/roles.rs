//! One least-privilege PostgreSQL role per binary (`migrate --roles`), as
//! the broker has one user per binary (`topology::identities`).
//!
//! A worker reads and writes the rows of its own domain's schema and
//! nothing else: it cannot read another domain's tables, nor create, alter
//! or drop any (the schema is the migrating role's, which alone changes
//! it). The publisher reads the read models it serves (`GET /orders`,
//! stock, products) and writes nothing; `dlq` writes its own schema and
//! reads each domain's inbox, to tell whether a dead message was applied.
//! Every role may read the migrations' ledger, so that a binary can check
//! that the schema is current without the right to change it.
//!
//! Applying is idempotent and exact: every privilege a role holds on the
//! house's schemas is revoked and the listed ones granted, in one
//! transaction, so a role never keeps a right this table no longer gives.

use contract::Domain;
use sqlx::{Executor, PgConnection};

/// The schema `dlq` keeps its archive and audit trail in.
pub const DLQ_SCHEMA: &str = "dlq";

/// The table in which the migrator records what it applied.
const MIGRATIONS_LEDGER: &str = "public._sqlx_migrations";

/// The rights of one binary's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseRole {
    /// The binary that connects as this role.
    pub binary: &'static str,
    /// The variable `migrate --roles` reads the role's password from.
    pub password_var: &'static str,
    /// Schemas whose rows the role reads and writes (tables and sequences,
    /// present and future).
    pub writes: Vec<&'static str>,
    /// Tables the role reads, as `(schema, table)`.
    pub reads: Vec<(&'static str, &'static str)>,
    /// Whether every transaction of the role is read-only
    /// (`default_transaction_read_only`), beside its grants.
    pub read_only: bool,
}

/// Every binary's role.
pub fn roles() -> Vec<DatabaseRole> {
    let mut roles: Vec<DatabaseRole> = Domain::ALL
        .iter()
        .map(|domain| DatabaseRole {
            binary: domain.worker(),
            password_var: match domain {
                Domain::Order => "DATABASE_PASSWORD_ORDER_WORKER",
                Domain::Inventory => "DATABASE_PASSWORD_INVENTORY_WORKER",
                Domain::Payment => "DATABASE_PASSWORD_PAYMENT_WORKER",
                Domain::Notification => "DATABASE_PASSWORD_NOTIFICATION_WORKER",
            },
            writes: vec![domain.schema()],
            reads: Vec::new(),
            read_only: false,
        })
        .collect();
    let orders = Domain::Order.schema();
    let inventory = Domain::Inventory.schema();
    roles.push(DatabaseRole {
        binary: "publisher",
        password_var: "DATABASE_PASSWORD_PUBLISHER",
        writes: Vec::new(),
        // What the HTTP API shows: orders with their lines and history,
        // the catalog it checks prices against, and stock.
        reads: vec![
            (orders, "orders"),
            (orders, "order_items"),
            (orders, "order_events"),
            (orders, "products"),
            (inventory, "stock"),
        ],
        read_only: true,
    });
    roles.push(DatabaseRole {
        binary: "dlq",
        password_var: "DATABASE_PASSWORD_DLQ",
        writes: vec![DLQ_SCHEMA],
        reads: Domain::ALL.iter().map(|d| (d.schema(), "inbox")).collect(),
        read_only: false,
    });
    roles
}

/// Every schema the house's roles are granted rights on.
fn schemas() -> Vec<&'static str> {
    let mut schemas: Vec<&'static str> = Domain::ALL.iter().map(|d| d.schema()).collect();
    schemas.push(DLQ_SCHEMA);
    schemas
}

impl DatabaseRole {
    /// The role's name: `prefix` and the binary's name, with `_` for `-`
    /// (`orderflow_order_worker`), so that it needs no quoting in a URL.
    pub fn name(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.binary.replace('-', "_"))
    }

    /// Creates the role (or sets its password) and gives it exactly its
    /// rights on the database `connection` is on, in one transaction. Run
    /// after the migrations, by a role that owns the schemas and may
    /// create roles.
    pub async fn apply(
        &self,
        connection: &mut PgConnection,
        prefix: &str,
        password: &str,
    ) -> Result<(), sqlx::Error> {
        let role = self.name(prefix);
        let mut tx = sqlx::Connection::begin(&mut *connection).await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
                .bind(&role)
                .fetch_one(&mut *tx)
                .await?;
        // The server quotes the name and the password (%I, %L): neither
        // can be a bind parameter of a utility statement.
        let verb = if exists { "ALTER" } else { "CREATE" };
        let statement: String = sqlx::query_scalar(
            "SELECT format('%s ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L', $1::text, $2::text, $3::text)",
        )
        .bind(verb)
        .bind(&role)
        .bind(password)
        .fetch_one(&mut *tx)
        .await?;
        tx.execute(sqlx::AssertSqlSafe(statement)).await?;
        let mut statements = Vec::new();
        let quoted = quote_ident(&role);
        for schema in schemas() {
            let schema = quote_ident(schema);
            statements.extend([
                format!("REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {quoted}"),
                format!("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {schema} FROM {quoted}"),
                format!("REVOKE ALL ON SCHEMA {schema} FROM {quoted}"),
                format!("ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} REVOKE ALL ON TABLES FROM {quoted}"),
                format!("ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} REVOKE ALL ON SEQUENCES FROM {quoted}"),
            ]);
        }
        for schema in &self.writes {
            let schema = quote_ident(schema);
            statements.extend([
                format!("GRANT USAGE ON SCHEMA {schema} TO {quoted}"),
                format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {quoted}"),
                format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {quoted}"),
                // Tables a later migration adds are the role's to use too.
                format!("ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {quoted}"),
                format!("ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT USAGE, SELECT ON SEQUENCES TO {quoted}"),
            ]);
        }
        for (schema, table) in &self.reads {
            let (schema, table) = (quote_ident(schema), quote_ident(table));
            statements.extend([
                format!("GRANT USAGE ON SCHEMA {schema} TO {quoted}"),
                format!("GRANT SELECT ON {schema}.{table} TO {quoted}"),
            ]);
        }
        statements.push(format!("GRANT SELECT ON {MIGRATIONS_LEDGER} TO {quoted}"));
        statements.push(format!(
            "ALTER ROLE {quoted} SET default_transaction_read_only = {}",
            if self.read_only { "on" } else { "off" }
        ));
        for statement in statements {
            tx.execute(sqlx::AssertSqlSafe(statement)).await?;
        }
        tx.commit().await
    }
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Removes the role `prefix` names for `binary`'s, with every privilege it
/// holds in the database `connection` is on (a test's cleanup; `DROP
/// ROLE` refuses a role that still holds grants).
pub async fn drop_role(
    connection: &mut PgConnection,
    role: &DatabaseRole,
    prefix: &str,
) -> Result<(), sqlx::Error> {
    let quoted = quote_ident(&role.name(prefix));
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role.name(prefix))
            .fetch_one(&mut *connection)
            .await?;
    if exists {
        connection
            .execute(sqlx::AssertSqlSafe(format!("DROP OWNED BY {quoted}")))
            .await?;
        connection
            .execute(sqlx::AssertSqlSafe(format!("DROP ROLE {quoted}")))
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_writes_its_own_schema_only_and_the_publisher_writes_none() {
        let roles = roles();
        for domain in Domain::ALL {
            let role = roles.iter().find(|r| r.binary == domain.worker());
            assert_eq!(
                role.map(|r| r.writes.clone()),
                Some(vec![domain.schema()]),
                "{}",
                domain.worker()
            );
        }
        let publisher = roles.iter().find(|r| r.binary == "publisher");
        assert!(publisher.is_some_and(|p| p.writes.is_empty() && p.read_only));
        let names: Vec<String> = roles.iter().map(|r| r.name("orderflow_")).collect();
        assert!(
            names.contains(&"orderflow_order_worker".to_owned()),
            "{names:?}"
        );
        for role in &roles {
            let expected = format!(
                "DATABASE_PASSWORD_{}",
                role.binary.replace('-', "_").to_ascii_uppercase()
            );
            assert_eq!(role.password_var, expected);
        }
    }
}
