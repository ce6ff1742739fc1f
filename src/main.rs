//! The `tierproxy` binary: parse the command line, load and validate the config, start
//! logging, and run until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tierproxy::config::{Config, Overrides};

/// Every request allocates and frees small buffers; glibc's allocator spent a fifth of
/// the proxy's time on them under a mixed L1 workload.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "tierproxy",
    version,
    about = "Redis-protocol proxy with an L1 cache and S3 spill"
)]
struct Cli {
    /// TOML config file (see conf/tierproxy.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Client listener address, e.g. 127.0.0.1:6380.
    #[arg(long)]
    listen: Option<String>,
    /// Upstream seeds: host:port or redis://[user:pass@]host:port, comma-separated.
    #[arg(long)]
    upstream: Option<String>,
    /// Admin HTTP listener (/healthz, /readyz).
    #[arg(long)]
    admin_listen: Option<String>,
    /// PEM certificate chain: the client listener then speaks only TLS.
    #[arg(long)]
    tls_cert: Option<String>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: Option<String>,
    /// PEM CA certificates: clients must present a certificate signed by one of them.
    #[arg(long)]
    tls_ca_cert: Option<String>,
    /// Validate the configuration and exit (0 = valid).
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Delete spilled objects no stub refers to (two mark-and-sweep passes), then exit.
    Sweep {
        /// Report what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn init_logging(cfg: &Config) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, reload, EnvFilter};
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let layer = fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    if cfg.log.format == "json" {
        registry.with(layer.json()).init();
    } else {
        registry.with(layer.with_ansi(false)).init();
    }
    tierproxy::reload::set_log_reloader(Box::new(move |level: &str| {
        if std::env::var_os("RUST_LOG").is_some() {
            return Err("RUST_LOG is set and takes precedence over log.level".into());
        }
        let f = EnvFilter::try_new(level).map_err(|e| format!("log.level {level:?}: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())
    }));
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGTERM handler");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.listen,
        admin_listen: cli.admin_listen,
        upstream: cli.upstream,
        tls_cert: cli.tls_cert,
        tls_key: cli.tls_key,
        tls_ca_cert: cli.tls_ca_cert,
    };
    let config_path = cli.config.clone();
    let reload_overrides = overrides.clone();
    let cfg = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tierproxy: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!("tierproxy: configuration OK");
        return ExitCode::SUCCESS;
    }
    init_logging(&cfg);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.workers())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tierproxy: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Sweep { dry_run }) = cli.command {
        return match rt.block_on(tierproxy::sweep(cfg, dry_run)) {
            Ok(report) => {
                println!("tierproxy sweep: {report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tierproxy sweep: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let loader: tierproxy::reload::Loader =
        Box::new(move || Config::load(config_path.as_deref(), &reload_overrides));
    match rt.block_on(tierproxy::run(cfg, shutdown_signal(), Some(loader))) {
        Ok(()) => {
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tierproxy: {e}");
            ExitCode::FAILURE
        }
    }
}
