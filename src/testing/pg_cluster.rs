//! A throwaway PostgreSQL cluster for tests and benchmarks.
//!
//! [`PgCluster::start`] runs `initdb` and `pg_ctl start` on a fresh temporary
//! directory and serves connections on a Unix-domain socket only
//! (`listen_addresses = ''`), so concurrent test processes never fight over
//! TCP ports: each cluster has its own socket directory and uses port 5432,
//! which only names the socket file (`.s.PGSQL.5432`).
//!
//! Connection URLs have the form
//! `postgres://tally@localhost/DB?host=/path/to/socketdir&port=5432`; sqlx
//! treats a `host` query parameter that starts with `/` as the directory of
//! a Unix socket.
//!
//! The server is tuned for speed, not durability (`fsync = off`,
//! `synchronous_commit = off`, `full_page_writes = off`), unless started with
//! [`Durability::Durable`] (benchmarks of commit-bound work). PostgreSQL refuses
//! to run as root, so when the current user is root the server programs run
//! as the `postgres` user through `runuser`.
//!
//! Every cluster is watched by a small detached shell process that stops the
//! server and deletes its directory once the process that started it exits.
//! This matters for [`PgCluster::shared`], whose cluster lives in a static
//! and is never dropped.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, anyhow, bail};
use sqlx::Connection as _;

/// Port the server is configured with. With a private socket directory the
/// port only names the socket file, so a fixed value cannot collide.
const PORT: u16 = 5432;

/// User the server runs as when the current process is root.
const SERVER_OS_USER: &str = "postgres";

/// Database role created by `initdb` and used in every URL.
const DB_USER: &str = "tally";

/// Longest socket path we accept (`sun_path` holds 108 bytes including NUL).
const MAX_SOCKET_PATH: usize = 100;

/// Counter making database names unique within the process.
static DB_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Whether a throwaway cluster flushes commits to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fsync`, `synchronous_commit` and `full_page_writes` off: tests, and
    /// benchmarks of CPU cost.
    Fast,
    /// PostgreSQL's defaults: every commit waits for its WAL flush, as on a
    /// production server.
    Durable,
}

impl Durability {
    /// The settings it implies, for reports.
    pub const fn settings(self) -> &'static str {
        match self {
            Self::Fast => "fsync=off synchronous_commit=off full_page_writes=off shared_buffers=128MB",
            Self::Durable => {
                "fsync=on synchronous_commit=on full_page_writes=on (PostgreSQL defaults) shared_buffers=128MB"
            }
        }
    }
}

/// A running, throwaway PostgreSQL cluster.
///
/// The cluster is stopped and its directory removed when the value is dropped,
/// or, at the latest, shortly after the current process exits.
#[derive(Debug)]
pub struct PgCluster {
    /// Temporary directory holding everything: data dir, socket, log.
    root: PathBuf,
    /// Data directory (`root/data`).
    data_dir: PathBuf,
    /// Directory of the Unix socket (the temporary directory itself).
    socket_dir: PathBuf,
    /// Server log file (`root/postgres.log`).
    log_file: PathBuf,
    /// Directory holding `initdb`, `pg_ctl`, `postgres`, `psql`, ...
    bin_dir: PathBuf,
    /// Port naming the socket file.
    port: u16,
    /// Whether the server programs run as [`SERVER_OS_USER`] via `runuser`.
    run_as_postgres: bool,
    /// Whether commits reach the disk.
    durability: Durability,
    /// Whether the server also listens on TCP (127.0.0.1, [`Self::port`]).
    tcp: bool,
    /// The certificate and key when the server also serves TLS over TCP.
    tls: Option<Tls>,
    /// The detached process cleaning up after the current process exits.
    watchdog: Option<Child>,
}

/// A server certificate and its private key, PEM.
#[derive(Debug, Clone)]
struct Tls {
    cert_pem: String,
    key_pem: String,
}

impl PgCluster {
    /// Starts a new cluster in a fresh temporary directory.
    ///
    /// Looks for `initdb` and `pg_ctl` in the highest-versioned
    /// `/usr/lib/postgresql/*/bin`, then on `PATH`. Runs `initdb` (trust
    /// authentication, superuser `tally`, UTF-8, C locale) and
    /// `pg_ctl start -w`, serving a Unix socket only. When running as root,
    /// the server runs as the `postgres` user.
    ///
    /// # Errors
    ///
    /// Fails if the PostgreSQL server binaries are missing, if the `postgres`
    /// user is needed but missing, or if `initdb` or the server fail; the
    /// error then includes the tail of their output.
    pub fn start() -> anyhow::Result<PgCluster> {
        Self::start_with(Durability::Fast)
    }

    /// [`PgCluster::start`] with the given durability.
    ///
    /// # Errors
    ///
    /// As [`PgCluster::start`].
    pub fn start_with(durability: Durability) -> anyhow::Result<PgCluster> {
        Self::start_configured(durability, false, None)
    }

    /// [`PgCluster::start`] (durable) whose server also listens on TCP, on
    /// 127.0.0.1 at a free port ([`PgCluster::port`]), for tests of what only
    /// TCP shows: a stopped server there refuses connections (a Unix socket
    /// just disappears), and TLS needs it. [`PgCluster::tcp_url`] names a
    /// database there.
    ///
    /// # Errors
    ///
    /// As [`PgCluster::start`].
    pub fn start_with_tcp() -> anyhow::Result<PgCluster> {
        Self::start_configured(Durability::Durable, true, None)
    }

    /// [`PgCluster::start_with_tcp`] with `ssl = on` and the given
    /// certificate and private key (PEM).
    ///
    /// # Errors
    ///
    /// As [`PgCluster::start`], and when the files cannot be written.
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> anyhow::Result<PgCluster> {
        let tls = Tls {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        };
        Self::start_configured(Durability::Durable, true, Some(tls))
    }

    fn start_configured(durability: Durability, tcp: bool, tls: Option<Tls>) -> anyhow::Result<PgCluster> {
        // A free TCP port is only free when the system hands it out: another
        // process can take it before PostgreSQL binds it, so a port found
        // taken is tried again with another.
        let mut attempt = 1;
        loop {
            match Self::start_once(durability, tcp, tls.clone()) {
                Err(e) if tcp && attempt < 3 && format!("{e:#}").contains("could not bind") => {
                    tracing::warn!(attempt, "the throwaway cluster's TCP port was taken; trying another");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// One try of [`PgCluster::start_configured`].
    fn start_once(durability: Durability, tcp: bool, tls: Option<Tls>) -> anyhow::Result<PgCluster> {
        let bin_dir = find_bin_dir()?;
        let run_as_postgres = current_uid() == Some(0);
        if run_as_postgres {
            let status = Command::new("id")
                .arg("-u")
                .arg(SERVER_OS_USER)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("running `id`")?;
            if !status.success() {
                bail!(
                    "running as root, but PostgreSQL refuses to run as root and there is no \
                     `{SERVER_OS_USER}` user to run it as: install Debian's postgresql package \
                     or create the user"
                );
            }
        }

        let root = tempfile::Builder::new()
            .prefix("tally-pg-")
            .tempdir_in(temp_base(run_as_postgres))
            .context("creating a temporary directory for PostgreSQL")?
            .keep();
        let mut cluster = PgCluster {
            data_dir: root.join("data"),
            socket_dir: root.clone(),
            log_file: root.join("postgres.log"),
            root,
            bin_dir,
            port: if tcp {
                // A free TCP port: the system hands one out and takes it back.
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .context("finding a free TCP port for PostgreSQL")?
                    .port()
            } else {
                PORT
            },
            run_as_postgres,
            durability,
            tcp,
            tls,
            watchdog: None,
        };
        // From here on, dropping `cluster` (also on error) cleans up.
        cluster.watchdog = Some(cluster.spawn_watchdog()?);
        cluster.init_and_start()?;
        tracing::debug!(
            dir = %cluster.root.display(),
            bin_dir = %cluster.bin_dir.display(),
            "started throwaway PostgreSQL cluster"
        );
        Ok(cluster)
    }

    /// A process-wide shared cluster, started on first use.
    ///
    /// It is never dropped; a watchdog stops it after the process exits.
    /// If starting failed, every call returns the same error text.
    ///
    /// # Errors
    ///
    /// Returns the (cached) error message of [`PgCluster::start`].
    pub fn shared() -> Result<&'static PgCluster, String> {
        static SHARED: OnceLock<Result<PgCluster, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| PgCluster::start().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Creates a new, empty database with a unique name and returns its sqlx URL.
    ///
    /// # Errors
    ///
    /// Fails if the maintenance database cannot be reached or
    /// `CREATE DATABASE` fails.
    pub async fn create_database(&self) -> anyhow::Result<String> {
        let name = format!(
            "tally_{}_{}_{:08x}",
            std::process::id(),
            DB_COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let mut conn = sqlx::PgConnection::connect(&self.admin_url()).await.with_context(|| {
            format!(
                "connecting to the test PostgreSQL cluster at {}",
                self.socket_dir.display()
            )
        })?;
        sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name}"))?;
        conn.close().await.ok();
        Ok(self.url(&name))
    }

    /// URL of the `postgres` maintenance database.
    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    /// Directory of the PostgreSQL binaries (`psql`, `pg_dump`, ... are there too).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Directory containing the server's Unix socket (`psql -h` takes it).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// Port of the server; with Unix sockets it names the socket file (`psql -p`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// sqlx URL of database `db` over TCP on `localhost` (a cluster started
    /// with [`PgCluster::start_with_tcp`] or [`PgCluster::start_with_tls`]).
    pub fn tcp_url(&self, db: &str) -> String {
        format!("postgres://{DB_USER}@localhost:{}/{db}", self.port)
    }

    /// sqlx URL of database `db`.
    fn url(&self, db: &str) -> String {
        format!(
            "postgres://{DB_USER}@localhost/{db}?host={}&port={}",
            encode_query_value(&self.socket_dir.to_string_lossy()),
            self.port
        )
    }

    /// Runs `initdb`, writes the configuration and starts the server.
    fn init_and_start(&self) -> anyhow::Result<()> {
        if self.run_as_postgres {
            let out = Command::new("chown")
                .arg(format!("{SERVER_OS_USER}:"))
                .arg(&self.root)
                .output()
                .context("running chown")?;
            check(&out, "chown of the temporary directory")?;
        }

        let out = self
            .server_command("initdb")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-A", "trust", "-U", DB_USER, "--no-sync", "-E", "UTF8"])
            .arg("--locale=C")
            .output()
            .context("running initdb")?;
        check(&out, "initdb")?;

        let mut conf = String::from("\n# Throwaway test cluster (tally::testing::pg_cluster)\n");
        let mut settings = vec![
            ("listen_addresses", "''".to_owned()),
            (
                "unix_socket_directories",
                conf_string(&self.socket_dir.to_string_lossy()),
            ),
            ("port", self.port.to_string()),
            ("max_connections", "300".to_owned()),
            ("shared_buffers", "'128MB'".to_owned()),
        ];
        if self.durability == Durability::Fast {
            settings.extend([
                ("fsync", "off".to_owned()),
                ("synchronous_commit", "off".to_owned()),
                ("full_page_writes", "off".to_owned()),
            ]);
        }
        if self.tcp {
            settings[0].1 = "'127.0.0.1'".to_owned();
        }
        if let Some(tls) = &self.tls {
            let cert = self.root.join("server.crt");
            let key = self.root.join("server.key");
            std::fs::write(&cert, &tls.cert_pem).context("writing the server certificate")?;
            std::fs::write(&key, &tls.key_pem).context("writing the server key")?;
            // PostgreSQL wants its key readable by its owner only, and that
            // owner the server's user.
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .context("chmod of the server key")?;
            if self.run_as_postgres {
                let out = Command::new("chown")
                    .arg(format!("{SERVER_OS_USER}:"))
                    .arg(&cert)
                    .arg(&key)
                    .output()
                    .context("running chown")?;
                check(&out, "chown of the certificate and key")?;
            }
            settings.extend([
                ("ssl", "on".to_owned()),
                ("ssl_cert_file", conf_string(&cert.to_string_lossy())),
                ("ssl_key_file", conf_string(&key.to_string_lossy())),
            ]);
        }
        for (key, value) in settings {
            writeln!(conf, "{key} = {value}").expect("writing to a String");
        }
        self.append_to_conf(&conf)?;
        self.start_server()
    }

    /// The server log so far (empty if it cannot be read).
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Starts the server of an initialised (or stopped) cluster and waits
    /// until it accepts connections.
    ///
    /// # Errors
    ///
    /// Fails if `pg_ctl start` fails; the error then includes the tail of
    /// the server log.
    pub fn start_server(&self) -> anyhow::Result<()> {
        let out = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-w", "-t", "120", "start"])
            .output()
            .context("running pg_ctl start")?;
        if let Err(err) = check(&out, "pg_ctl start") {
            return Err(err.context(format!(
                "PostgreSQL failed to start; tail of {}:\n{}",
                self.log_file.display(),
                log_tail(&self.log_file)
            )));
        }
        Ok(())
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: connections are
    /// cut, nothing is shut down cleanly), as when a database host goes away.
    /// [`PgCluster::start_server`] brings it back with its data.
    ///
    /// # Errors
    ///
    /// Fails if `pg_ctl stop` fails.
    pub fn stop_server(&self) -> anyhow::Result<()> {
        self.pg_ctl("stop", &["-w", "-m", "immediate"])
    }

    /// Stops the server cleanly and starts it again as a standby with hot
    /// standby off: it answers every connection "the database system is not
    /// accepting connections" (SQLSTATE 57P03, as while starting up or
    /// recovering after a crash) until [`PgCluster::promote`].
    ///
    /// # Errors
    ///
    /// Fails if `pg_ctl stop`, writing the files or the restart fail.
    pub fn restart_as_standby_not_accepting_connections(&self) -> anyhow::Result<()> {
        self.pg_ctl("stop", &["-w", "-m", "fast"])?;
        self.append_to_conf("\nhot_standby = off\n")?;
        let signal = self.data_dir.join("standby.signal");
        std::fs::write(&signal, "").with_context(|| format!("writing {}", signal.display()))?;
        self.start_server()
    }

    /// Starts a stopped standby ([`PgCluster::restart_as_standby_not_accepting_connections`],
    /// then [`PgCluster::stop_server`]) as a primary again.
    ///
    /// # Errors
    ///
    /// Fails if the standby signal cannot be removed or the start fails.
    pub fn start_as_primary(&self) -> anyhow::Result<()> {
        let signal = self.data_dir.join("standby.signal");
        std::fs::remove_file(&signal).with_context(|| format!("removing {}", signal.display()))?;
        self.start_server()
    }

    /// Promotes a standby ([`PgCluster::restart_as_standby_not_accepting_connections`])
    /// and waits until it accepts connections.
    ///
    /// # Errors
    ///
    /// Fails if `pg_ctl promote` fails.
    pub fn promote(&self) -> anyhow::Result<()> {
        self.pg_ctl("promote", &["-w", "-t", "60"])
    }

    /// Stops the server cleanly, moves its transaction ids to epoch `epoch`
    /// (`pg_resetwal -e`, which wants a clean shutdown) and starts it again:
    /// what an operator does after restoring a dump taken from a cluster whose
    /// ids were further along (docs/operations.md).
    ///
    /// # Errors
    ///
    /// Fails if `pg_ctl stop`, `pg_resetwal` or the restart fail.
    pub fn set_transaction_epoch(&self, epoch: u32) -> anyhow::Result<()> {
        self.pg_ctl("stop", &["-w", "-m", "fast"])?;
        let out = self
            .server_command("pg_resetwal")
            .arg("-e")
            .arg(epoch.to_string())
            .arg("-D")
            .arg(&self.data_dir)
            .output()
            .context("running pg_resetwal")?;
        check(&out, "pg_resetwal")?;
        self.start_server()
    }

    /// Runs `pg_ctl -D DATA_DIR OPTIONS ACTION` and fails with its output
    /// if it fails.
    fn pg_ctl(&self, action: &str, options: &[&str]) -> anyhow::Result<()> {
        let out = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .args(options)
            .arg(action)
            .output()
            .with_context(|| format!("running pg_ctl {action}"))?;
        check(&out, &format!("pg_ctl {action}"))
    }

    /// Appends `text` to the cluster's `postgresql.conf` (read at the next
    /// start; a later line wins over an earlier one).
    fn append_to_conf(&self, text: &str) -> anyhow::Result<()> {
        let conf_path = self.data_dir.join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .with_context(|| format!("opening {}", conf_path.display()))?;
        std::io::Write::write_all(&mut file, text.as_bytes())
            .with_context(|| format!("writing {}", conf_path.display()))
    }

    /// A command running server program `program` from the bin dir, as the
    /// `postgres` user when we are root, with a neutral environment.
    fn server_command(&self, program: &str) -> Command {
        let program = self.bin_dir.join(program);
        let mut cmd = if self.run_as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", SERVER_OS_USER, "--"]).arg(program);
            cmd
        } else {
            Command::new(program)
        };
        cmd.current_dir(&self.root)
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .stdin(Stdio::null());
        cmd
    }

    /// Spawns the detached process that stops the server and removes the
    /// directory once this process has exited.
    fn spawn_watchdog(&self) -> anyhow::Result<Child> {
        // Paths travel as positional parameters, so no shell quoting is needed.
        const SCRIPT: &str = r#"p=$1; dir=$2; data=$3; shift 3
while kill -0 "$p" 2>/dev/null; do sleep 1; done
"$@" -D "$data" stop -m immediate >/dev/null 2>&1
rm -rf "$dir""#;
        let pg_ctl = self.bin_dir.join("pg_ctl");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg("tally-pg-watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.root)
            .arg(&self.data_dir);
        if self.run_as_postgres {
            cmd.args(["runuser", "-u", SERVER_OS_USER, "--"]);
        }
        cmd.arg(pg_ctl)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group: a Ctrl-C on the test run must not kill it.
            .process_group(0);
        cmd.spawn().context("spawning the PostgreSQL watchdog")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            watchdog.kill().ok();
            watchdog.wait().ok();
        }
        if self.data_dir.join("postmaster.pid").exists() {
            self.server_command("pg_ctl")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-w", "stop", "-m", "immediate"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok();
        }
        std::fs::remove_dir_all(&self.root).ok();
    }
}

/// Finds the directory holding `initdb` and `pg_ctl`.
fn find_bin_dir() -> anyhow::Result<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();

    let mut versioned: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse::<u64>().ok())
                .collect::<Option<Vec<u64>>>()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versioned.sort();
    if let Some((_, bin)) = versioned.pop() {
        return Ok(bin);
    }

    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server(&dir) {
                return Ok(dir);
            }
        }
    }
    Err(anyhow!(
        "PostgreSQL server binaries not found (initdb and pg_ctl in /usr/lib/postgresql/*/bin \
         or on PATH): install Debian's postgresql package"
    ))
}

/// Effective uid of the current process, if it can be determined.
fn current_uid() -> Option<u32> {
    if let Ok(meta) = std::fs::metadata("/proc/self") {
        return Some(meta.uid());
    }
    let out = Command::new("id").arg("-u").output().ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// Directory to create the cluster directory in.
///
/// `/tmp` when the server runs as `postgres` (it must be able to reach the
/// directory) or when `$TMPDIR` is so long that the socket path would not fit.
fn temp_base(run_as_postgres: bool) -> PathBuf {
    let base = std::env::temp_dir();
    // "/tally-pg-XXXXXX/.s.PGSQL.5432.lock"
    let needed = base.as_os_str().len() + 40;
    if run_as_postgres || needed > MAX_SOCKET_PATH {
        PathBuf::from("/tmp")
    } else {
        base
    }
}

/// Fails with the tail of the output if the command did not succeed.
fn check(out: &Output, what: &str) -> anyhow::Result<()> {
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    bail!("{what} failed ({}):\n{}", out.status, tail(&text, 40))
}

/// The last lines of the server log, or a note that it cannot be read.
fn log_tail(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => tail(&String::from_utf8_lossy(&bytes), 40),
        Err(err) => format!("(cannot read log: {err})"),
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A single-quoted `postgresql.conf` string.
fn conf_string(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Percent-encodes a URL query value, keeping `/` readable.
fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            write!(out, "%{byte:02X}").expect("writing to a String");
        }
    }
    out
}
