//! Building the application from settings: store, migrations, server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use chrono::Duration;

use crate::domain::entry::DEFAULT_LATE_HORIZON_DAYS;
use crate::domain::plan::{DefaultPlanChange, from_the_start};
use crate::domain::{Catalog, KeySecret, Role};
use crate::http::{AppState, Server};
use crate::store::{self, NewApiKey, Store};

/// The default database: a SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://tally.db";
/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7600";

/// Everything a Tally process is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `sqlite://FILE` or `postgres://…`.
    pub database_url: String,
    /// A plan catalog file; `None` for the built-in one.
    pub plans: Option<PathBuf>,
    /// Where `serve` listens.
    pub listen: SocketAddr,
    /// Entries older than this many days are refused.
    pub late_horizon_days: i64,
    /// An extra admin key from the environment.
    pub admin_key: Option<String>,
    /// Job definitions directory; `jobs/` when present, else the built-in schedule.
    pub jobs: Option<PathBuf>,
    /// Where report jobs write.
    pub reports_dir: PathBuf,
    /// How long `serve` waits, from the signal, for the requests and the job
    /// run in flight once asked to stop.
    pub shutdown_grace: std::time::Duration,
    /// How long `serve` waits for a request's head (and an idle kept-alive
    /// connection for its next one) and for the client to take an answer
    /// before it drops the connection, and for a body (plus a second per
    /// 16 KiB received) before it answers 408.
    pub read_timeout: std::time::Duration,
    /// How many HTTP connections `serve` holds open at once; more wait in
    /// the listen queue.
    pub max_connections: usize,
    /// The stores opened with these settings (and their clones), for
    /// [`OpenedStores::close_all`] on the way out.
    pub opened: OpenedStores,
}

/// The stores a [`Settings`] opened. A process that ends without closing
/// them leaves SQLite's last commits in `tally.db-wal` only (the file alone
/// is stale: a copy of it loses them) and drops PostgreSQL connections
/// without a goodbye; the command line closes them all when a command ends.
#[derive(Clone, Default)]
pub struct OpenedStores(Arc<std::sync::Mutex<Vec<Arc<dyn Store>>>>);

impl OpenedStores {
    /// Remembers `store`, to close it later.
    fn add(&self, store: Arc<dyn Store>) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(store);
    }

    /// Closes every store opened so far ([`Store::close`]) and forgets them.
    pub async fn close_all(&self) {
        let stores = std::mem::take(&mut *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for store in stores {
            store.close().await;
        }
    }
}

impl std::fmt::Debug for OpenedStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.0.lock().map_or(0, |stores| stores.len());
        write!(f, "OpenedStores({count})")
    }
}

/// How long `serve` finishes requests in flight after a stop request, by
/// default: long enough for any request Tally answers, short enough that a
/// client that never finishes its body cannot hold the process.
pub const DEFAULT_SHUTDOWN_GRACE_SECONDS: u64 = 30;

/// How long `serve` waits for a request's head, for its body (plus a second
/// per 16 KiB received, so a slow but steady upload finishes) and for the
/// client to take an answer, by default: a client that holds a connection
/// open without sending or reading (slowloris) loses it then, so a few
/// hosts cannot hold every file descriptor.
pub const DEFAULT_READ_TIMEOUT_SECONDS: u64 = 30;

/// How many HTTP connections `serve` holds open at once, by default: far
/// more than the callers of a usage ledger keep (a pool per service
/// replica), and few enough for the open-file limit a service manager
/// usually grants (systemd's hard limit is 524 288; the soft one, 1 024, is
/// raised as needed).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// The largest `--max-connections` taken: past it, the open-file limit
/// rather than the flag is what bounds a process.
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

impl Default for Settings {
    fn default() -> Self {
        Self {
            database_url: DEFAULT_DATABASE_URL.into(),
            plans: None,
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            late_horizon_days: DEFAULT_LATE_HORIZON_DAYS,
            admin_key: None,
            jobs: None,
            reports_dir: PathBuf::from("reports"),
            shutdown_grace: std::time::Duration::from_secs(DEFAULT_SHUTDOWN_GRACE_SECONDS),
            read_timeout: std::time::Duration::from_secs(DEFAULT_READ_TIMEOUT_SECONDS),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            opened: OpenedStores::default(),
        }
    }
}

/// Parses `--listen`: an IP address and port (`0.0.0.0:7600`, `[::1]:7600`)
/// or a host name and port (`localhost:7600`), resolved once at start; a name
/// with several addresses listens on the first.
pub fn parse_listen(raw: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = raw.parse() {
        return Ok(address);
    }
    let hint = "give HOST:PORT, e.g. 127.0.0.1:7600, 0.0.0.0:7600, [::1]:7600 or localhost:7600";
    match raw.rsplit_once(':') {
        // A bare number is a port without its host (`--listen 7600`).
        None if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(match raw.parse::<u16>() {
                Ok(_) => format!(
                    "{raw:?} has no host; for every interface give 0.0.0.0:{raw}, for this machine only 127.0.0.1:{raw}"
                ),
                Err(_) => format!("{raw:?} has no host, and as a port it is out of range (0 to 65535); {hint}"),
            });
        }
        None => return Err(format!("{raw:?} has no port; {hint}")),
        Some((_, port)) if port.parse::<u16>().is_err() => {
            let why = if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
                "is out of range (0 to 65535)"
            } else {
                "is not a port number"
            };
            return Err(format!("{raw:?}: {port:?} {why}; {hint}"));
        }
        Some(_) => {}
    }
    std::net::ToSocketAddrs::to_socket_addrs(raw)
        .map_err(|e| format!("cannot resolve {raw:?}: {e}; {hint}"))?
        .next()
        .ok_or_else(|| format!("{raw:?} resolves to no address; {hint}"))
}

/// The longest `--shutdown-grace` and `--read-timeout` taken: a day. Far
/// past any use, and far below what overflows a clock instant (a timer set
/// u64::MAX seconds ahead panics).
pub const MAX_WAIT_SECONDS: u64 = 86_400;

/// Parses `--shutdown-grace`: whole seconds, 0 to [`MAX_WAIT_SECONDS`] (0
/// stops at once, dropping requests in flight).
pub fn parse_shutdown_grace(raw: &str) -> Result<u64, String> {
    match raw.trim().parse::<u64>() {
        Ok(seconds) if seconds <= MAX_WAIT_SECONDS => Ok(seconds),
        _ => Err(format!(
            "{raw:?} is not a whole number of seconds from 0 to {MAX_WAIT_SECONDS} (a day); give e.g. 30 (the \
             default), or 0 to stop at once"
        )),
    }
}

/// Parses `--read-timeout`: whole seconds, 1 to [`MAX_WAIT_SECONDS`].
pub fn parse_read_timeout(raw: &str) -> Result<u64, String> {
    match raw.trim().parse::<u64>() {
        Ok(seconds) if (1..=MAX_WAIT_SECONDS).contains(&seconds) => Ok(seconds),
        _ => Err(format!(
            "{raw:?} is not a whole number of seconds from 1 to {MAX_WAIT_SECONDS} (a day); give e.g. \
             {DEFAULT_READ_TIMEOUT_SECONDS} (the default)"
        )),
    }
}

/// Parses `--database-url`: any text but an empty one, which is most often
/// `TALLY_DATABASE_URL=` set to nothing (review BM: it was answered
/// `unsupported database URL ""`); the URL itself is read when the database
/// is opened.
pub fn parse_database_url(raw: &str) -> Result<String, String> {
    if raw.trim().is_empty() {
        return Err(format!(
            "the database URL is empty (is TALLY_DATABASE_URL set to nothing?); unset it for the default \
             {DEFAULT_DATABASE_URL}, or give one: sqlite://FILE or postgres://USER@HOST/DB"
        ));
    }
    Ok(raw.to_owned())
}

/// Parses `--max-connections`: a whole number from 1 to [`MAX_CONNECTIONS_LIMIT`].
pub fn parse_max_connections(raw: &str) -> Result<usize, String> {
    match raw.trim().parse::<usize>() {
        Ok(connections) if (1..=MAX_CONNECTIONS_LIMIT).contains(&connections) => Ok(connections),
        _ => Err(format!(
            "{raw:?} is not a whole number of connections from 1 to {MAX_CONNECTIONS_LIMIT}; give e.g. \
             {DEFAULT_MAX_CONNECTIONS} (the default)"
        )),
    }
}

impl Settings {
    /// Loads the catalog the settings name.
    pub fn load_catalog(&self) -> anyhow::Result<Catalog> {
        match &self.plans {
            None => Ok(Catalog::builtin()),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read plan catalog {}", path.display()))?;
                Catalog::parse(&text).with_context(|| format!("in plan catalog {}", path.display()))
            }
        }
    }

    /// [`Settings::open_store`] for a command that reads what is there (a
    /// report, a check, `verify`, the rollup): a SQLite file that does not
    /// exist is an error, not a new empty database. Run from the wrong
    /// directory, or with a misspelt path, such a command would otherwise
    /// create one and report on it: an empty export, a `verify` that passes.
    pub async fn open_existing_store(&self) -> anyhow::Result<(Arc<dyn Store>, Arc<Catalog>)> {
        if let Some(file) = store::sqlite_file(&self.database_url)? {
            match std::fs::metadata(&file) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => anyhow::bail!(
                    "the database {} is a folder, not a SQLite file (from --database-url or TALLY_DATABASE_URL)",
                    file.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                    "there is no database at {} (from --database-url or TALLY_DATABASE_URL; a relative path, \
                     such as the default tally.db, is taken from the working directory {}): this \
                     command reads an existing database and does not create one. The commands that write \
                     create it: serve, migrate, post, import, keys create, accounts set-plan and accounts override",
                    file.display(),
                    std::env::current_dir().map_or_else(|_| "(unknown)".to_owned(), |d| d.display().to_string()),
                ),
                Err(e) => {
                    return Err(
                        anyhow::Error::new(e).context(format!("cannot read the database file {}", file.display()))
                    );
                }
            }
        }
        self.open_store().await
    }

    /// Opens the database and runs its migrations, warning when the
    /// catalog's `default_plan` is not the one `serve` recorded there.
    pub async fn open_store(&self) -> anyhow::Result<(Arc<dyn Store>, Arc<Catalog>)> {
        let catalog = Arc::new(self.load_catalog()?);
        Ok((self.open_store_with(catalog.clone()).await?, catalog))
    }

    /// [`Settings::open_store`] with the catalog already loaded, for a
    /// command that checks its input against it first: bad input then
    /// fails before the database is opened, so it leaves no new SQLite file
    /// behind (a typo run from the wrong folder would otherwise create one).
    ///
    /// An in-memory SQLite database is refused here: it lives only as long
    /// as the process, so a command's writes would be gone when it exits
    /// (review BM: `post` said "created entry 1" into nothing) and its reads
    /// would report on an empty ledger. Only `serve` lives long enough to use
    /// one.
    pub async fn open_store_with(&self, catalog: Arc<Catalog>) -> anyhow::Result<Arc<dyn Store>> {
        anyhow::ensure!(
            !store::sqlite_in_memory(&self.database_url),
            "{} is an in-memory database, which lives only as long as the process: this command's writes \
             would be gone when it exits, and its reads would find nothing. Give a file (--database-url \
             sqlite://tally.db), or run `tally serve` on it, which keeps it as long as the server runs",
            self.database_url
        );
        let store = self.open_and_migrate(catalog.clone(), DigitsChange::Refused).await?;
        warn_if_default_plan_differs(store.as_ref(), &catalog).await;
        Ok(store)
    }

    /// [`Settings::open_store`] for `serve`, whose catalog is the
    /// deployment's: a new `default_plan` is recorded, the accounts already
    /// known keeping the previous one ([`Store::record_default_plan`]).
    /// Every other command (`migrate` too, which operators run by hand on
    /// upgrades) only compares, so that one run without the server's
    /// catalog cannot re-plan accounts.
    pub async fn open_store_recording_default_plan(&self) -> anyhow::Result<(Arc<dyn Store>, Arc<Catalog>)> {
        let catalog = Arc::new(self.load_catalog()?);
        let store = self
            .open_and_migrate(catalog.clone(), DigitsChange::RecordedWhereNothingHeld)
            .await?;
        record_default_plan(store.as_ref(), &catalog).await;
        Ok((store, catalog))
    }

    /// Opens the database and runs its migrations.
    async fn open_and_migrate(&self, catalog: Arc<Catalog>, digits: DigitsChange) -> anyhow::Result<Arc<dyn Store>> {
        let store = store::connect(&self.database_url, catalog.clone()).await.map_err(|e| {
            let advice = if e.says_what_to_do() {
                ""
            } else {
                "; a SQLite file's folder must exist, a PostgreSQL server must be running with the database created"
            };
            anyhow::Error::new(e).context(format!(
                "cannot open database {} (set by --database-url or TALLY_DATABASE_URL{advice})",
                crate::store::redact_url(&self.database_url)
            ))
        })?;
        self.opened.add(store.clone());
        store.migrate().await?;
        refuse_changed_digits(store.as_ref(), &catalog, digits).await?;
        Ok(store)
    }
}

/// Refuses a catalog that changes the fractional digits of a resource the
/// database holds amounts of: each stored amount is an integer of the
/// resource's minor unit, which the new digits would read at another scale.
/// Where it holds none yet, `serve` records the new digits; any other
/// command refuses them too, since a server beside it may run the old
/// catalog and write with the old digits (review AS).
async fn refuse_changed_digits(store: &dyn Store, catalog: &Catalog, change: DigitsChange) -> anyhow::Result<()> {
    let clashes = match store::reconcile_digits(store, catalog, change == DigitsChange::RecordedWhereNothingHeld).await
    {
        Ok(clashes) => clashes,
        // A reporting role granted SELECT before migration 0021 cannot read
        // the new table (review AT): its reads go on, unchecked, and say so.
        Err(e) if e.is_permission_denied() => {
            let why = crate::telemetry::cause_chain(&e);
            tracing::warn!(
                error = %why,
                "cannot compare the catalog's fractional digits with those of the stored amounts ({why}): amounts \
                 are read with this catalog's digits unchecked; grant this role SELECT on resource_digits \
                 (docs/operations.md, \"Read-only access\")"
            );
            return Ok(());
        }
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context("cannot compare the catalog's fractional digits with those of the stored amounts"));
        }
    };
    if clashes.is_empty() {
        return Ok(());
    }
    let said: Vec<String> = clashes
        .iter()
        .map(|c| {
            if c.holds_amounts {
                format!(
                    "resource '{}' has decimals = {} in the catalog, but this database stores its amounts with {} \
                     fractional digit{}: this catalog would read each one {} times {}; put back decimals = {} (a \
                     resource's decimals cannot change once it has entries or overrides: declare a new resource \
                     instead)",
                    c.resource,
                    c.catalog,
                    c.stored,
                    if c.stored == 1 { "" } else { "s" },
                    10_u64.saturating_pow(c.stored.abs_diff(c.catalog)),
                    if c.catalog > c.stored { "smaller" } else { "larger" },
                    c.stored,
                )
            } else {
                format!(
                    "resource '{}' has decimals = {} in the catalog, but this database records {} for it; it holds \
                     no amounts yet, so its digits may change, but only `serve` records them: stop the servers that \
                     run the old catalog, then start `serve` with this one (a command beside a server on the old \
                     catalog would read and write at digits that server does not use)",
                    c.resource, c.catalog, c.stored,
                )
            }
        })
        .collect();
    anyhow::bail!("{} (docs/plans.md, \"Precision is part of history\")", said.join("; "))
}

/// Whether opening a database may record new digits for a resource that
/// holds no amounts yet ([`store::reconcile_digits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DigitsChange {
    /// `serve`: the deployment's catalog.
    RecordedWhereNothingHeld,
    /// Every other command.
    Refused,
}

/// Warns when the catalog's `default_plan` is not the one recorded by the
/// last `serve`: accounts on the default are answered here as
/// on this catalog's, which is most likely not the server's catalog.
async fn warn_if_default_plan_differs(store: &dyn Store, catalog: &Catalog) {
    match store.recorded_default_plan().await {
        Ok(Some(recorded)) if recorded != catalog.default_plan => tracing::warn!(
            default_plan = %catalog.default_plan,
            recorded = %recorded,
            "this catalog's default_plan is '{}', but the database's is '{recorded}' (recorded by the last `serve`): \
             accounts without a plan of their own are answered here as on '{}'. Run with the server's \
             catalog (--plans or TALLY_PLANS); a new default takes effect when `serve` starts with it",
            catalog.default_plan,
            catalog.default_plan
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(
            error = %crate::telemetry::cause_chain(&error),
            "cannot read the database's default plan to compare it with the catalog's ({}); the command \
             goes on with the catalog's default_plan '{}'; if this persists, check that the database is \
             migrated (tally migrate)",
            crate::telemetry::cause_chain(&error),
            catalog.default_plan
        ),
    }
}

/// Records the catalog's `default_plan` in the database and says what a
/// change of it did ([`Store::record_default_plan`]). A database that
/// cannot take the record (read-only) still opens, with a warning: its
/// accounts without a plan are then on the new default, their past too.
async fn record_default_plan(store: &dyn Store, catalog: &Catalog) {
    match store.record_default_plan(catalog).await {
        Ok(None) => {}
        Ok(Some(DefaultPlanChange { from: None, to, .. })) => tracing::info!(
            default_plan = %to,
            "recorded default_plan '{to}' as this database's default plan: accounts without a plan of their own \
             are on it; when a later catalog changes it, the accounts known then keep '{to}'"
        ),
        Ok(Some(DefaultPlanChange {
            from: Some(from),
            to,
            kept: Some(kept),
        })) => tracing::warn!(
            from = %from,
            to = %to,
            kept,
            "default_plan changed from '{from}' to '{to}': accounts new from now on get '{to}'; the {kept} \
             account(s) known now keep '{from}' wherever they have no plan of their own (assigned it from {}, \
             before any assignment of theirs; `tally accounts set-plan ACCOUNT PLAN` moves one)",
            from_the_start().format("%Y-%m-%d")
        ),
        Ok(Some(DefaultPlanChange {
            from: Some(from),
            to,
            kept: None,
        })) => tracing::warn!(
            from = %from,
            to = %to,
            "default_plan changed from '{from}' to '{to}', and '{from}' is no longer in the catalog: the \
             accounts that were on it by default are on '{to}' now, their past included (invoices and \
             checks of past months too); to keep them on '{from}', put the plan back in the catalog, start \
             with the old default once, then change it again"
        ),
        Err(error) => tracing::warn!(
            default_plan = %catalog.default_plan,
            error = %crate::telemetry::cause_chain(&error),
            "cannot record the catalog's default_plan '{}' in the database ({}); if the database's default is \
             another, accounts without a plan are answered here as on '{}', their past included: start \
             `tally serve` with this catalog on a database it can write (the primary) to record it",
            catalog.default_plan,
            crate::telemetry::cause_chain(&error),
            catalog.default_plan
        ),
    }
}

/// Warns, once per plan, when accounts are on a plan the catalog lacks (a
/// plan removed from the file while accounts were still on it): nothing
/// limits them. Not fatal: the operator may be about to move them, with this
/// very binary.
async fn warn_about_missing_plans(store: &dyn Store, catalog: &Catalog) {
    match crate::usage::quota::plans_missing_from_catalog(store, catalog, chrono::Utc::now()).await {
        Ok(missing) => {
            for (plan, accounts) in missing {
                tracing::warn!(
                    plan = %plan,
                    accounts,
                    "plan '{plan}' is not in the catalog, yet {accounts} account(s) are on it now or from a later date: \
                     nothing limits them until the plan is back in the catalog or they move \
                     (tally accounts set-plan ACCOUNT PLAN); known plans: {}",
                    catalog.plan_names()
                );
            }
        }
        Err(error) => tracing::warn!(
            error = %error,
            "cannot check the plans accounts are on against the catalog: {error}"
        ),
    }
}

/// A running-ready Tally: store opened, migrated, server bound.
pub struct Application {
    server: Server,
    state: AppState,
    port: u16,
    reports_dir: PathBuf,
}

/// What [`Application::bootstrap_admin_key`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootstrap {
    /// The database had no key: one admin key was created and shown.
    Created,
    /// The database had keys, so none was created.
    HadKeys {
        /// Whether one of them is an admin key that is not revoked.
        admin_valid: bool,
    },
}

impl Application {
    /// Opens the store, runs migrations and binds the listener.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let (store, catalog) = settings.open_store_recording_default_plan().await?;
        warn_about_missing_plans(store.as_ref(), &catalog).await;
        let state = AppState {
            read_timeout: settings.read_timeout,
            ..AppState::new(
                store,
                catalog,
                settings.admin_key.as_deref(),
                Duration::days(settings.late_horizon_days),
            )
        };
        let server = Server::bind(
            settings.listen,
            settings.shutdown_grace,
            settings.max_connections,
            state.clone(),
        )
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let port = server.local_addr()?.port();
        // Keep the rate limiters' memory bounded by the keys active lately.
        let rates = Arc::downgrade(&state.rates);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tick.tick().await;
                match rates.upgrade() {
                    Some(rates) => rates.retain_recent(),
                    None => break,
                }
            }
        });
        Ok(Self {
            server,
            state,
            port,
            reports_dir: settings.reports_dir.clone(),
        })
    }

    /// The port bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The shared state (store, catalog, metrics).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// On a database with no key at all, creates one admin key and hands its
    /// plaintext to `show`, once; else says whether a valid admin key is
    /// there, from the same read (revoked keys count as keys). When
    /// `show` fails the key is revoked: a valid key that nobody saw would be
    /// a secret lost somewhere (review BB: a failed stderr write was
    /// ignored), and the error says how to make one instead. The error
    /// quotes `show`'s failure rather than keeping it as its cause, so a
    /// broken pipe there is not taken for a reader that stopped reading,
    /// which the command line ends quietly (review BC).
    pub async fn bootstrap_admin_key(
        &self,
        show: impl FnOnce(&KeySecret) -> std::io::Result<()>,
    ) -> anyhow::Result<Bootstrap> {
        // Read first: a database that has keys needs no write here, so serve
        // starts on one that cannot be written (a standby, or
        // default_transaction_read_only) when its keys are in place.
        let keys = self.state.store.list_api_keys().await?;
        if !keys.is_empty() {
            let admin_valid = keys
                .iter()
                .any(|key| key.role == Role::Admin && key.revoked_at.is_none());
            return Ok(Bootstrap::HadKeys { admin_valid });
        }
        let (secret, new) = new_key(Role::Admin, None, Some("bootstrap".into()))?;
        let created = self.state.store.create_first_api_key(&new).await.context(
            "the database has no API key, and creating the bootstrap admin key failed; if the database is \
             read-only (a standby, or default_transaction_read_only), create a key where it can be written \
             (`tally keys create --role admin`) or set TALLY_ADMIN_KEY",
        )?;
        let Some(created) = created else {
            // Another replica stored its key first, and shows it.
            return Ok(Bootstrap::HadKeys { admin_valid: true });
        };
        if let Err(shown) = show(&secret) {
            self.state.store.revoke_api_key(created.id).await.with_context(|| {
                format!(
                    "the bootstrap admin key (id {}) could not be shown ({shown}), and revoking it failed: revoke \
                     it with `tally keys revoke {}`",
                    created.id, created.id
                )
            })?;
            anyhow::bail!(
                "the database had no API key, and the bootstrap admin key Tally created (id {}) could not be \
                 shown ({shown}), so it was revoked; create an admin key with `tally keys create --role admin` \
                 (it prints the key on stdout) or set TALLY_ADMIN_KEY, then start again",
                created.id
            );
        }
        Ok(Bootstrap::Created)
    }

    /// A job runner over this application's store and metrics.
    pub fn job_runner(&self, jobs: Vec<crate::jobs::JobDefinition>) -> Arc<crate::jobs::JobRunner> {
        let context = crate::jobs::JobContext {
            store: self.state.store.clone(),
            catalog: self.state.catalog.clone(),
            metrics: self.state.metrics.clone(),
            reports_dir: self.reports_dir.clone(),
        };
        Arc::new(crate::jobs::JobRunner::new(context, jobs))
    }

    /// Serves until `shutdown` resolves.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.server.run(shutdown).await.context("HTTP server failed")
    }
}

/// A new key's plaintext and what to store of it ([`Store::create_api_key`]),
/// once its role and account agree: checked before any database is opened.
pub fn new_key(
    role: Role,
    account: Option<crate::domain::AccountId>,
    name: Option<String>,
) -> anyhow::Result<(KeySecret, NewApiKey)> {
    match (role, &account) {
        (Role::Reader, None) => anyhow::bail!("a reader key reads one account: pass --account ACCOUNT"),
        // Admin passes every account check, so a binding would only look
        // like a limit.
        (Role::Admin, Some(account)) => anyhow::bail!(
            "an admin key reaches every account and cannot be bound to '{account}'; \
             for a key limited to one account use --role service or --role reader with --account"
        ),
        _ => {}
    }
    if let Some(control) = name.as_deref().and_then(|name| name.chars().find(|c| c.is_control())) {
        anyhow::bail!(
            "a key's name is shown on one line of `tally keys list`, so it cannot hold control characters \
             (this one holds {control:?}); use spaces or punctuation instead"
        );
    }
    let secret = KeySecret::generate();
    let new = NewApiKey {
        hash: secret.hash(),
        prefix: secret.prefix(),
        role,
        account,
        name,
    };
    Ok((secret, new))
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM). A SIGHUP
/// meanwhile is logged and ignored: its default action would kill the server
/// without finishing its requests, and log rotation tools send it.
pub async fn shutdown_signal() {
    ignore_hangups();
    match stop_requested() {
        Ok(stop) => stop.await,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C or SIGTERM; stop the server another way");
            std::future::pending::<()>().await;
        }
    }
    tracing::info!("shutdown requested; finishing requests in flight");
}

/// Logs each SIGHUP from now on instead of dying of it.
fn ignore_hangups() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut hangup) => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    tracing::warn!(
                        "SIGHUP ignored: Tally reloads nothing; restart it to apply new settings, \
                         and send SIGTERM to stop it"
                    );
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot catch SIGHUP; a hangup will stop the server"),
    }
}

/// Listens for Ctrl-C and SIGTERM from now on (the handlers are installed
/// before this returns, so a signal that comes before the first poll is not
/// lost, nor does it kill the process), and resolves when one comes.
pub fn stop_requested() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
    })
}

#[cfg(test)]
mod tests {
    use super::parse_listen;

    #[test]
    fn listen_takes_an_ip_or_a_host_name_with_a_port() {
        assert_eq!(parse_listen("0.0.0.0:7600").unwrap().to_string(), "0.0.0.0:7600");
        assert_eq!(parse_listen("[::1]:7600").unwrap().to_string(), "[::1]:7600");
        // It once said "invalid socket address syntax" for a host name.
        let local = parse_listen("localhost:7601").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 7601, "{local}");
        for bad in ["localhost", "127.0.0.1", "localhost:http", ":7600x"] {
            let message = parse_listen(bad).unwrap_err();
            assert!(message.contains("give HOST:PORT"), "{bad}: {message}");
        }
        // A port alone once got "has no port".
        let message = parse_listen("7600").unwrap_err();
        assert!(
            message.contains("\"7600\" has no host; for every interface give 0.0.0.0:7600"),
            "{message}"
        );
        let message = parse_listen("99999").unwrap_err();
        assert!(
            message.contains("has no host, and as a port it is out of range"),
            "{message}"
        );
        // It once said "has no port" of a port out of range.
        let message = parse_listen("localhost:99999").unwrap_err();
        assert!(message.contains("\"99999\" is out of range (0 to 65535)"), "{message}");
    }
}
