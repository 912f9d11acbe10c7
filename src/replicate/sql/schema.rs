//! Connections to the shards, the schema migrations in `migrations/`, and the server checks made
//! before any two-phase commit.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio_postgres::config::Host;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls};

use super::tls::{MakeRustls, ShardTls};

/// One versioned SQL file of `migrations/`, compiled into the binary.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. A test checks that this list and the directory agree.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_shard_schema.sql",
        sql: include_str!("../../../migrations/0001_shard_schema.sql"),
    },
    Migration {
        version: 2,
        name: "0002_watermark_record.sql",
        sql: include_str!("../../../migrations/0002_watermark_record.sql"),
    },
];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A shard's URL, parsed, with a label that never shows a password.
#[derive(Clone)]
pub struct Shard {
    pub index: usize,
    config: Config,
    /// `host:port/database`, for messages.
    pub label: String,
    /// `host:port`: shards with the same server share its `max_prepared_transactions`.
    pub server: String,
    /// TLS, verified against `--shard-ca`, when that was given and the URL does not say
    /// `sslmode=disable` (see `tls`).
    tls: Option<ShardTls>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shard {} ({})", self.index, self.label)
    }
}

/// Parses shard `index`'s URL and checks that it names a host and a database, as `replicate
/// sql` needs, without connecting: what `cluster set-sql-shards` stores is then what the
/// replicator accepts. An error names the part at fault (the driver's own message is only
/// "invalid connection string") and never echoes the URL, which may hold a password.
pub fn check_url(index: usize, url: &str) -> anyhow::Result<Config> {
    const EXPECTED: &str = "expected postgres://user@host:port/database";
    // The driver reads a URL only under these schemes, in lower case; anything else goes to
    // its key=value parser, whose "unknown option" quotes everything up to the first `=`, a
    // password included (`Postgres://u:pw@h/db?sslmode=...`): not echoed.
    let url_form = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if !url_form && url.contains("://") {
        bail!(
            "shard {index}: not a PostgreSQL URL (the scheme must be postgres:// or postgresql://, in lower case); {EXPECTED}"
        );
    }
    let config: Config = url.parse().map_err(|e: tokio_postgres::Error| {
        let reason = match std::error::Error::source(&e).map(ToString::to_string) {
            // A URL's parameters are named by their keys (a password is a known key's value);
            // "invalid value for option `name`" names one of the driver's own options.
            Some(detail) if url_form || detail.starts_with("invalid value for option") => {
                format!("{e}: {detail}")
            }
            Some(_) => {
                format!("{e}: an unknown option (not shown: the string may hold a password)")
            }
            None => e.to_string(),
        };
        anyhow::anyhow!("shard {index}: not a PostgreSQL URL ({reason}); {EXPECTED}")
    })?;
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        bail!("shard {index}: the URL names no host; {EXPECTED}");
    }
    if config.get_dbname().is_none() {
        bail!("shard {index}: the URL names no database; {EXPECTED}");
    }
    Ok(config)
}

/// `host:port` of a connection's server(s), as its messages name it (the driver's defaults,
/// localhost and 5432, where the URL names none).
pub fn server_label(config: &Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    format!(
        "{}:{}",
        if hosts.is_empty() {
            "localhost".to_string()
        } else {
            hosts.join(",")
        },
        if ports.is_empty() {
            "5432".to_string()
        } else {
            ports.join(",")
        }
    )
}

impl Shard {
    /// Parses a shard URL for a connection without TLS (`parse_with_tls` with none).
    pub fn parse(index: usize, url: &str) -> anyhow::Result<Shard> {
        Shard::parse_with_tls(index, url, None)
    }

    /// Parses a shard URL. With `tls` (`--shard-ca`), `sslmode=prefer` and `require` connect
    /// with verified TLS; without, `sslmode=require` is refused here, naming the flag (the
    /// driver would only fail at every connection, "no TLS implementation configured").
    pub fn parse_with_tls(
        index: usize,
        url: &str,
        tls: Option<&ShardTls>,
    ) -> anyhow::Result<Shard> {
        let mut config = check_url(index, url)?;
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .application_name("wallet-replicate-sql");
        let server = server_label(&config);
        // `check_url` made sure there is one.
        let database = config.get_dbname().unwrap_or_default().to_string();
        let label = format!("{server}/{database}");
        // A `hostaddr` makes the driver connect over TCP to it, whatever the host says.
        let local = !config.get_hosts().is_empty()
            && config.get_hostaddrs().is_empty()
            && config
                .get_hosts()
                .iter()
                .all(|h| matches!(h, Host::Unix(_)));
        let tls = match config.get_ssl_mode() {
            // A Unix socket is this host's: nothing to encrypt, no name to check, whatever
            // the sslmode (PostgreSQL offers no TLS on one: `require` failed every connection
            // with "server does not support TLS").
            _ if local => {
                config.ssl_mode(SslMode::Disable);
                None
            }
            SslMode::Disable => None,
            SslMode::Require if tls.is_none() => bail!(
                "shard {index} ({label}): sslmode=require needs --shard-ca FILE (env WALLET_SHARD_CA), the CA certificates the shard servers' certificates are checked against"
            ),
            _ => tls.cloned(),
        };
        // With a CA, TLS is required: under `prefer`, a server (or a man in the middle)
        // answering "no TLS" would get a plain session.
        if tls.is_some() {
            config.ssl_mode(SslMode::Require);
        }
        Ok(Shard {
            index,
            config,
            label,
            server,
            tls,
        })
    }

    /// Opens a connection; its driver task runs on the current runtime until the client drops.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        // The driver's error stays in the chain: `is_transient` tells a server that is down
        // (wait) from a database that does not exist, a refused login or a URL the driver
        // refuses (stop).
        let context = || {
            format!(
                "connecting to PostgreSQL shard {} at {}",
                self.index, self.label
            )
        };
        let label = self.label.clone();
        let closed = move |e: tokio_postgres::Error| {
            tracing::debug!(shard = %label, error = %e, "shard connection closed");
        };
        match &self.tls {
            None => {
                let (client, connection) =
                    self.config.connect(NoTls).await.with_context(context)?;
                tokio::spawn(async move { connection.await.map_err(closed) });
                Ok(client)
            }
            Some(tls) => {
                let connected = self.config.connect(MakeRustls(tls.clone())).await;
                let (client, connection) = connected
                    .map_err(|e| {
                        let hint = if super::tls::is_tls_refusal(&e) {
                            " (the server's certificate must be signed by a CA of --shard-ca and name the URL's host)"
                        } else {
                            ""
                        };
                        anyhow::Error::new(e).context(format!("{}{hint}", context()))
                    })?;
                tokio::spawn(async move { connection.await.map_err(closed) });
                Ok(client)
            }
        }
    }
}

/// Parses the shard list, refusing duplicates (two shards in one database would share a
/// watermark row).
pub fn parse_shards(urls: &[String], tls: Option<&ShardTls>) -> anyhow::Result<Vec<Shard>> {
    if urls.is_empty() {
        bail!("the SQL shard list is empty");
    }
    if urls.len() > i32::MAX as usize {
        bail!("too many shards");
    }
    let shards: Vec<Shard> = urls
        .iter()
        .enumerate()
        .map(|(i, url)| Shard::parse_with_tls(i, url, tls))
        .collect::<anyhow::Result<_>>()?;
    let mut seen = HashMap::new();
    for shard in &shards {
        if let Some(other) = seen.insert(shard.label.clone(), shard.index) {
            bail!(
                "shards {other} and {} are the same database {}",
                shard.index,
                shard.label
            );
        }
    }
    Ok(shards)
}

/// How many shards live on each server (`host:port`).
pub fn shards_per_server(shards: &[Shard]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for shard in shards {
        *out.entry(shard.server.clone()).or_insert(0) += 1;
    }
    out
}

/// The `max_prepared_transactions` check: at most one batch is prepared at a time, so a server
/// needs one prepared transaction per shard it holds.
pub fn check_max_prepared(shard: &Shard, value: &str, needed: usize) -> anyhow::Result<()> {
    let parsed: usize = value.trim().parse().with_context(|| {
        format!(
            "PostgreSQL shard {} ({}): max_prepared_transactions is {value:?}",
            shard.index, shard.label
        )
    })?;
    if parsed < needed {
        bail!(
            "PostgreSQL shard {} ({}): max_prepared_transactions is {parsed}, but two-phase commit needs at least {needed} \
             (one per shard on this server; the default is 0, which disables PREPARE TRANSACTION). \
             Set max_prepared_transactions = 64 in postgresql.conf (or start with -c max_prepared_transactions=64) and restart the server.",
            shard.index,
            shard.label
        );
    }
    Ok(())
}

/// Reads `max_prepared_transactions` and checks it.
pub async fn verify_server(client: &Client, shard: &Shard, needed: usize) -> anyhow::Result<()> {
    let row = client
        .query_one("SHOW max_prepared_transactions", &[])
        .await
        .with_context(|| format!("shard {}: SHOW max_prepared_transactions", shard.label))?;
    let value: String = row.try_get(0)?;
    check_max_prepared(shard, &value, needed)
}

fn checksum(sql: &str) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(sql.as_bytes()))
}

const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// Applies the missing migrations in one transaction (serialised by an advisory lock, so two
/// replicators starting at once do not race), after checking that those already applied are
/// the ones this binary knows. Returns how many were applied.
pub async fn migrate(client: &mut Client, shard: &Shard) -> anyhow::Result<usize> {
    let tx = client.transaction().await?;
    // A lock held elsewhere (a prepared transaction this replicator does not own) fails the
    // migration with an error naming it instead of queueing for ever behind it.
    tx.batch_execute("SET LOCAL lock_timeout = '10s'").await?;
    tx.batch_execute("SELECT pg_advisory_xact_lock(7233100116500221001)")
        .await?;
    tx.batch_execute(MIGRATIONS_TABLE).await?;
    let applied = applied_migrations(&tx).await?;
    check_known(shard, &applied, false)?;
    let mut count = 0;
    for migration in MIGRATIONS {
        if applied.contains_key(&migration.version) {
            continue;
        }
        tx.batch_execute(migration.sql).await.with_context(|| {
            format!(
                "shard {} ({}): migration {}",
                shard.index, shard.label, migration.name
            )
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[
                &migration.version,
                &migration.name,
                &checksum(migration.sql),
            ],
        )
        .await?;
        tracing::info!(shard = %shard.label, migration = migration.name, "migration applied");
        count += 1;
    }
    tx.commit().await?;
    Ok(count)
}

async fn applied_migrations(
    client: &impl tokio_postgres::GenericClient,
) -> anyhow::Result<HashMap<i32, String>> {
    let rows = client
        .query("SELECT version, checksum FROM schema_migrations", &[])
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// Checks that every applied migration is known with the same text, and (with `complete`) that
/// none is missing.
fn check_known(
    shard: &Shard,
    applied: &HashMap<i32, String>,
    complete: bool,
) -> anyhow::Result<()> {
    for (version, sum) in applied {
        match MIGRATIONS.iter().find(|m| m.version == *version) {
            None => bail!(
                "shard {} ({}) has migration {version}, which this binary does not know: it is newer than this wallet",
                shard.index,
                shard.label
            ),
            Some(m) if checksum(m.sql) != *sum => bail!(
                "shard {} ({}): migration {} was applied with a different text (checksum {sum}, file {})",
                shard.index,
                shard.label,
                m.name,
                checksum(m.sql)
            ),
            Some(_) => {}
        }
    }
    if complete {
        let missing: Vec<&str> = MIGRATIONS
            .iter()
            .filter(|m| !applied.contains_key(&m.version))
            .map(|m| m.name)
            .collect();
        if !missing.is_empty() {
            bail!(
                "shard {} ({}) lacks migrations {missing:?}: run `wallet replicate sql --migrate`",
                shard.index,
                shard.label
            );
        }
    }
    Ok(())
}

/// Without `--migrate`: fails unless the schema is complete and known.
pub async fn check_schema(client: &Client, shard: &Shard) -> anyhow::Result<()> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        bail!(
            "shard {} ({}) has no schema: run `wallet replicate sql --migrate`",
            shard.index,
            shard.label
        );
    }
    let applied = applied_migrations(client).await?;
    check_known(shard, &applied, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_rustls::rustls;

    #[test]
    fn every_migration_file_is_compiled_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .expect("migrations/")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let names: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(files, names, "migrations/ and MIGRATIONS disagree");
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }

    #[test]
    fn labels_hide_passwords_and_duplicates_are_refused() {
        let shard = Shard::parse(0, "postgres://u:secret@db1:5433/shard_a").expect("parse");
        assert_eq!(shard.label, "db1:5433/shard_a");
        assert!(!format!("{shard:?}").contains("secret"));
        let same = parse_shards(
            &[
                "postgres://u@db1:5433/shard_a".into(),
                "postgres://v@db1:5433/shard_a".into(),
            ],
            None,
        );
        assert!(same.is_err());
        assert!(
            Shard::parse(0, "postgres://db1:5433").is_err(),
            "no database"
        );
    }

    /// `sslmode=require` without `--shard-ca` is refused when the list is read, naming the
    /// flag; with it, TLS is used unless the URL says `sslmode=disable`.
    #[test]
    fn tls_follows_the_urls_sslmode_and_the_ca() {
        let url = "postgres://u@db1:5433/shard_a";
        let error =
            Shard::parse(2, &format!("{url}?sslmode=require")).expect_err("require without a CA");
        let text = format!("{error:#}");
        assert!(
            text.contains("shard 2") && text.contains("--shard-ca"),
            "{text}"
        );
        assert!(Shard::parse(0, url).expect("prefer").tls.is_none());
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls: ShardTls = std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        );
        for (mode, with_tls) in [
            ("", true),
            ("?sslmode=require", true),
            ("?sslmode=disable", false),
        ] {
            let shard =
                Shard::parse_with_tls(0, &format!("{url}{mode}"), Some(&tls)).expect("parse");
            assert_eq!(shard.tls.is_some(), with_tls, "{mode:?}");
            // With a CA, `prefer` is `require`: no plain session if the server says "no TLS".
            let required = shard.config.get_ssl_mode() == SslMode::Require;
            assert_eq!(required, with_tls, "{mode:?}");
        }
        // A Unix socket stays plain, CA or not (it used to fail every connection: the driver
        // asks for a connector with an empty host name, which no certificate can name).
        // Nor does `sslmode=require` make it ask the server for TLS (which it refuses on a
        // socket), with or without a CA.
        let socket = "postgres://u@%2Fvar%2Frun%2Fpostgresql/db";
        for mode in [
            "",
            "?sslmode=require",
            "?sslmode=prefer",
            "?sslmode=disable",
        ] {
            for ca in [Some(&tls), None] {
                let shard = Shard::parse_with_tls(0, &format!("{socket}{mode}"), ca)
                    .unwrap_or_else(|e| panic!("{mode:?}: {e:#}"));
                assert!(shard.tls.is_none(), "{mode:?}");
                assert_eq!(shard.config.get_ssl_mode(), SslMode::Disable, "{mode:?}");
            }
        }
        // With a `hostaddr` the driver connects over TCP: TLS as for any TCP shard.
        let tcp = format!("{socket}?hostaddr=10.0.0.5&sslmode=require");
        let shard = Shard::parse_with_tls(0, &tcp, Some(&tls)).expect("parse");
        assert!(shard.tls.is_some());
        assert_eq!(shard.config.get_ssl_mode(), SslMode::Require);
        assert!(Shard::parse(0, &tcp).is_err(), "require without a CA");
    }

    #[test]
    fn max_prepared_transactions_zero_is_refused_by_name() {
        let shard = Shard::parse(3, "postgres://postgres@127.0.0.1:25432/s3").expect("parse");
        let error = check_max_prepared(&shard, "0", 2).expect_err("0 must fail");
        let text = error.to_string();
        assert!(text.contains("max_prepared_transactions is 0"), "{text}");
        assert!(text.contains("127.0.0.1:25432/s3"), "{text}");
        assert!(check_max_prepared(&shard, "1", 2).is_err());
        assert!(check_max_prepared(&shard, "64", 2).is_ok());
    }
}
