//! Where data lives: one platform database for the whole deployment and one database per
//! tenant. Two backends share this interface:
//!
//! - SQLite (embedded default): `<data_dir>/platform.db` and `<data_dir>/tenants/<slug>.db`,
//!   WAL mode with `synchronous=FULL`, so a committed write survives a crash of the machine,
//!   not just of the process.
//! - PostgreSQL (`KEFU_DATABASE_URL`): the URL's database is the platform one; each tenant gets
//!   `<platform database>_<slug>` on the same server, created and dropped by Kefu.
//!
//! Handlers never come here directly: they get their tenant's connection from the
//! [`crate::tenancy::Tenant`] extractor.

pub mod held;
mod pools;
pub mod reader;
pub mod secrets;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use migration::{MigratorTrait, PlatformMigrator, TenantMigrator};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr,
    SqliteTransactionMode, Statement, TransactionOptions, TransactionTrait,
};

use crate::settings::{Settings, TenantPoolSettings};
pub use held::HeldConnection;
pub use pools::TenantPools;
use reader::SqliteReader;

/// How long a writer waits for SQLite's write lock before giving up. Long enough to ride out
/// a burst of concurrent writers, short enough that a stuck tenant fails visibly.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a caller waits for a pooled connection before the request fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A pooled connection unused this long is closed: a quiet tenant gives its connections (and
/// the database server's slots) back instead of holding them for good.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// PostgreSQL limits identifiers to 63 bytes; a tenant database is named
/// `<platform>_<slug>` with slugs of at most 32 bytes, which leaves 30 for the platform name.
const MAX_PLATFORM_DB_NAME: usize = 30;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    #[error("a tenant database named {0} already exists")]
    AlreadyExists(String),
    #[error("storage i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage configuration: {0}")]
    Config(String),
}

/// Which kind of server holds the databases.
#[derive(Clone, Debug)]
enum Backend {
    Sqlite {
        /// Absolute, so that connection URLs never depend on the working directory.
        dir: PathBuf,
    },
    Postgres {
        /// The configured URL; only its path (the database name) changes per tenant.
        server: url::Url,
        platform_db: String,
        /// A small pool on the `postgres` maintenance database for CREATE/DROP DATABASE.
        admin: DatabaseConnection,
    },
}

/// The deployment's databases: the platform connection and the tenant pools.
#[derive(Clone)]
pub struct Storage {
    backend: Backend,
    /// Tenants, domains and generated secrets.
    platform: DatabaseConnection,
    /// Open tenant connections, opened on first use and closed when idle.
    pools: TenantPools,
}

impl Storage {
    /// Opens (creating when missing) the platform database and applies its migrations.
    pub async fn open(settings: &Settings) -> Result<Self, StorageError> {
        let pool_settings = settings.tenant_pools.clone();
        let backend = match &settings.database_url {
            None => {
                std::fs::create_dir_all(settings.data_dir().join("tenants"))?;
                Backend::Sqlite {
                    dir: settings.data_dir().canonicalize()?,
                }
            }
            Some(url) => {
                let server = url::Url::parse(url)
                    .map_err(|e| StorageError::Config(format!("KEFU_DATABASE_URL: {e}")))?;
                let platform_db = server.path().trim_start_matches('/').to_owned();
                let platform_db = if platform_db.is_empty() {
                    "kefu".to_owned()
                } else {
                    platform_db
                };
                if platform_db.len() > MAX_PLATFORM_DB_NAME
                    || !platform_db
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    return Err(StorageError::Config(format!(
                        "KEFU_DATABASE_URL: database name {platform_db:?} must be at most \
                         {MAX_PLATFORM_DB_NAME} characters of a-z, 0-9 and _"
                    )));
                }
                let admin_url = with_database(&server, "postgres");
                let mut opts = ConnectOptions::new(admin_url);
                opts.max_connections(2)
                    .min_connections(0)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .sqlx_logging(false);
                let admin = Database::connect(opts).await?;
                Backend::Postgres {
                    server,
                    platform_db,
                    admin,
                }
            }
        };
        let platform_name = match &backend {
            Backend::Sqlite { .. } => "platform".to_owned(),
            Backend::Postgres { platform_db, .. } => {
                let name = platform_db.clone();
                match create_database(&backend, &name).await {
                    Ok(()) | Err(StorageError::AlreadyExists(_)) => {}
                    Err(e) => return Err(e),
                }
                name
            }
        };
        let platform = connect(
            &backend,
            &platform_path_or_name(&backend, &platform_name),
            4,
            true,
        )
        .await?;
        PlatformMigrator::up(&platform, None).await?;
        let pools = TenantPools::new(pool_settings);
        Ok(Self {
            backend,
            platform,
            pools,
        })
    }

    /// The platform database (tenants, domains, secrets).
    pub fn platform(&self) -> &DatabaseConnection {
        &self.platform
    }

    /// The platform database's URL on PostgreSQL (cluster mode keeps its queue leases
    /// there); `None` on SQLite.
    pub fn platform_url(&self) -> Option<String> {
        match &self.backend {
            Backend::Sqlite { .. } => None,
            Backend::Postgres {
                server,
                platform_db,
                ..
            } => Some(with_database(server, platform_db)),
        }
    }

    /// The database name a tenant with this slug gets.
    pub fn tenant_db_name(&self, slug: &str) -> String {
        match &self.backend {
            Backend::Sqlite { .. } => slug.to_owned(),
            Backend::Postgres { platform_db, .. } => {
                format!("{platform_db}_{}", slug.replace('-', "_"))
            }
        }
    }

    /// Creates an empty tenant database. Fails with [`StorageError::AlreadyExists`] rather
    /// than adopt a database that someone else made.
    pub async fn create_tenant_db(&self, db_name: &str) -> Result<(), StorageError> {
        match &self.backend {
            Backend::Sqlite { dir } => {
                let path = tenant_file(dir, db_name);
                // create_new is the atomic claim: two creators cannot both succeed.
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Err(StorageError::AlreadyExists(db_name.to_owned()))
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Backend::Postgres { .. } => create_database(&self.backend, db_name).await,
        }
    }

    /// Removes a tenant database and everything in it. Used only to undo a failed onboarding.
    pub async fn drop_tenant_db(&self, db_name: &str) -> Result<(), StorageError> {
        self.pools.evict(db_name);
        match &self.backend {
            Backend::Sqlite { dir } => {
                let path = tenant_file(dir, db_name);
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.clone().into_os_string();
                    p.push(suffix);
                    match std::fs::remove_file(PathBuf::from(p)) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(())
            }
            Backend::Postgres { admin, .. } => {
                admin
                    .execute_unprepared(&format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        quote_ident(db_name)
                    ))
                    .await?;
                Ok(())
            }
        }
    }

    /// Brings a tenant database's schema up to date; a no-op when it already is.
    pub async fn migrate_tenant(&self, db_name: &str) -> Result<(), StorageError> {
        let db = self.tenant(db_name).await?;
        TenantMigrator::up(&db, None).await?;
        Ok(())
    }

    /// A connection to a tenant's database, opened on first use.
    pub async fn tenant(&self, db_name: &str) -> Result<DatabaseConnection, StorageError> {
        Ok(self.tenant_db(db_name).await?.conn)
    }

    /// A tenant's database with its reads on the caller's thread where the backend has them.
    pub async fn tenant_db(&self, db_name: &str) -> Result<TenantDb, StorageError> {
        let backend = self.backend.clone();
        let connections = self.pools.settings().connections;
        let name = db_name.to_owned();
        self.pools
            .get(db_name, || async move {
                let conn = connect(
                    &backend,
                    &platform_path_or_name(&backend, &name),
                    connections,
                    false,
                )
                .await?;
                let reader = sqlite_file(&conn).map(|path| Arc::new(SqliteReader::new(path)));
                Ok(TenantDb { conn, reader })
            })
            .await
    }

    /// Settings of the tenant pools (for readiness and metrics).
    pub fn pool_settings(&self) -> &TenantPoolSettings {
        self.pools.settings()
    }

    /// How many tenant pools are open right now.
    pub fn open_tenant_pools(&self) -> usize {
        self.pools.len()
    }

    /// Checks that the platform database answers.
    pub async fn ping(&self) -> Result<(), StorageError> {
        self.platform.ping().await?;
        Ok(())
    }
}

/// Begins a transaction that will write. On SQLite it takes the write lock at `BEGIN`
/// (`BEGIN IMMEDIATE`): a deferred transaction that reads first and writes later fails at once
/// with `SQLITE_BUSY_SNAPSHOT` when another writer committed in between, which no busy timeout
/// can wait out. PostgreSQL ignores the option.
pub async fn begin_write<C: TransactionTrait>(db: &C) -> Result<C::Transaction, DbErr> {
    db.begin_with_options(TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..Default::default()
    })
    .await
}

/// One tenant's database as the pools hold it.
#[derive(Clone)]
pub struct TenantDb {
    pub conn: DatabaseConnection,
    /// SQLite only: reads on the caller's thread, for the hot paths (see [`reader`]).
    pub reader: Option<Arc<SqliteReader>>,
}

/// The file behind a SQLite pool (`None` for PostgreSQL and in-memory databases), for the
/// connections Kefu opens beside sqlx's: the writer thread's and the readers'.
pub(crate) fn sqlite_file(db: &DatabaseConnection) -> Option<PathBuf> {
    // Only pools that `Storage` opened come here, and those are connected; a disconnected
    // one would panic here as it would on its first query.
    if db.get_database_backend() != DbBackend::Sqlite {
        return None;
    }
    let opts = db.get_sqlite_connection_pool().connect_options();
    let path = opts.get_filename();
    let in_memory = path.as_os_str().is_empty() || path.to_string_lossy().contains(":memory:");
    (!in_memory).then(|| path.to_owned())
}

/// For SQLite the file path of a database (platform or tenant), for PostgreSQL its name.
fn platform_path_or_name(backend: &Backend, name: &str) -> String {
    match backend {
        Backend::Sqlite { dir } if name == "platform" => {
            dir.join("platform.db").to_string_lossy().into_owned()
        }
        Backend::Sqlite { dir } => tenant_file(dir, name).to_string_lossy().into_owned(),
        Backend::Postgres { .. } => name.to_owned(),
    }
}

fn tenant_file(dir: &Path, db_name: &str) -> PathBuf {
    dir.join("tenants").join(format!("{db_name}.db"))
}

fn with_database(server: &url::Url, db: &str) -> String {
    let mut url = server.clone();
    url.set_path(&format!("/{db}"));
    url.to_string()
}

/// Identifiers are built only from validated slugs, but quoting keeps that a second line of
/// defence rather than the only one.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn create_database(backend: &Backend, name: &str) -> Result<(), StorageError> {
    let Backend::Postgres { admin, .. } = backend else {
        return Err(StorageError::Config("not a PostgreSQL backend".into()));
    };
    let exists = admin
        .query_one_raw(Statement::from_sql_and_values(
            admin.get_database_backend(),
            "SELECT 1 FROM pg_database WHERE datname = $1",
            [name.into()],
        ))
        .await?
        .is_some();
    if exists {
        return Err(StorageError::AlreadyExists(name.to_owned()));
    }
    match admin
        .execute_unprepared(&format!("CREATE DATABASE {}", quote_ident(name)))
        .await
    {
        Ok(_) => Ok(()),
        // Another node won the race between our check and our CREATE.
        Err(e) if e.to_string().contains("already exists") => {
            Err(StorageError::AlreadyExists(name.to_owned()))
        }
        Err(e) => Err(e.into()),
    }
}

/// PostgreSQL: a connection of its own for a tenant's writer (`storage::writer`), beside the
/// tenant's pool and outside it ([`held`] says why); `None` for SQLite. The writer runs the
/// same few statements thousands of times a second, and planning each run afresh
/// (`force_custom_plan`, see [`connect`]) was about 40 % of its statement's time in
/// PostgreSQL (docs/benchmarks.md, "Cross-node"). This connection plans each statement once
/// (`force_generic_plan`) and with sequential scans off, so that the one plan is made of
/// index lookups whatever the tables' statistics said when it was made: every statement of the
/// writer finds its rows by key (`conversations::log::append_sql` says how its statement stays
/// so). Each of the two alone is not enough on a new tenant's tables: the generic plan of the
/// old join scanned `messages` whole, and so did a `LATERAL` lookup with sequential scans
/// allowed (the test `the_writers_one_plan_finds_rows_by_key_on_a_new_tenants_tables`).
/// Measured at 4,000 msg/s on one node: PostgreSQL's CPU 0.63 → 0.42 cores, p99 17 → 5 ms.
/// Lazy: it connects on the writer's first statement, and the writer closes it when it ends.
pub fn writer_connection(db: &DatabaseConnection) -> Option<HeldConnection> {
    if db.get_database_backend() != DbBackend::Postgres {
        return None;
    }
    // Checked just above: a PostgreSQL connection has a PostgreSQL pool.
    let pool = db.get_postgres_connection_pool();
    // Options given later win over the pool's own (`-c` settings apply in order).
    let options = (*pool.connect_options()).clone().options([
        ("plan_cache_mode", "force_generic_plan"),
        ("enable_seqscan", "off"),
    ]);
    Some(HeldConnection::new(options))
}

/// Opens a pool on one database. `path_or_name` is a file path (SQLite) or a database name
/// (PostgreSQL).
async fn connect(
    backend: &Backend,
    path_or_name: &str,
    max_connections: u32,
    create_if_missing: bool,
) -> Result<DatabaseConnection, StorageError> {
    let mut opts = match backend {
        Backend::Sqlite { .. } => {
            let mut opts = ConnectOptions::new(format!("sqlite://{path_or_name}"));
            opts.map_sqlx_sqlite_opts(move |o| {
                o.create_if_missing(create_if_missing)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT)
                    .foreign_keys(true)
            });
            opts
        }
        Backend::Postgres { server, .. } => {
            let mut opts = ConnectOptions::new(with_database(server, path_or_name));
            // sqlx prepares every statement once per connection, and after five runs
            // PostgreSQL may keep one generic plan for it, planned with the statistics of
            // the moment. A tenant's tables start empty, so that plan scans them whole, and
            // it stays until the next automatic ANALYZE: the writer's statement scanned
            // every message for re-sends (16 ms a batch at 100,000 messages). Planning each
            // run with its real parameters costs 0.6-1.2 ms for that statement, about 40 % of
            // its time in PostgreSQL (docs/benchmarks.md, "Cross-node"): the price of never
            // running a plan made for empty tables. The writer, which runs most statements,
            // has a connection of its own that avoids that price ([`writer_connection`]).
            opts.map_sqlx_postgres_opts(|o| o.options([("plan_cache_mode", "force_custom_plan")]));
            opts
        }
    };
    opts.max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .idle_timeout(POOL_IDLE_TIMEOUT)
        .sqlx_logging(false);
    Ok(Database::connect(opts).await?)
}
