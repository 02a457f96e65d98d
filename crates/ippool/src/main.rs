//! `ippool`: the daemon and its command line. It wires the ippool crates
//! together and nothing else: config parsing and validation
//! ([`config`]), the admin API ([`admin`]), metrics ([`metrics`]) and the
//! runtime ([`serve`]).

mod accessfile;
mod admin;
mod agentcmd;
mod apicmd;
mod backends;
mod client;
mod config;
mod events;
mod fleet;
mod logging;
mod logscan;
mod metrics;
mod monitor;
mod pools;
mod reload;
mod rules;
mod serve;

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::logging::LogFormat;

const ABOUT: &str = "Pools of IP addresses and the rules over them: a daemon and its tools.";

const MAIN_HELP: &str = "\
Examples:
  ippool check -c examples/loopback.toml        validate, print the effective config
  ippool serve -c examples/loopback.toml        run the daemon (admin API on 127.0.0.1:9095)
  ippool rules check -c examples/loopback.toml --set clients 10.1.2.3 192.0.2.7
  ippool serve -c examples/nginx-monitor.toml   watch an nginx pool's access log (GET /probe)
  ippool logscan /var/log/nginx/access.log --format '<log_format>' --address upstream_addr

Exit status: 0 success, 1 runtime failure (or a denied address for `rules check`),
2 bad config or bad arguments.
Log levels come from IPPOOL_LOG, else RUST_LOG (e.g. `debug`, `info,ippool=debug`); logs go to stderr.";

const SERVE_HELP: &str = "\
Example:
  ippool serve -c examples/loopback.toml
  curl -s 127.0.0.1:9095/ping                                   # pong
  curl -s '127.0.0.1:9095/api/rules/clients/check?ip=10.1.2.3'  # verdict and deciding rule
  curl -s 127.0.0.1:9095/metrics

Admin routes: GET /ping, /config, /metrics, /api/rules, /api/rules/{set}/check?ip=ADDR,
/probe[?pool=NAME][&ip=ADDR][&recent=N] (address health of every pool),
POST /api/pools/{pool}/addresses/{ip}/outcome (client feedback, token required).
Reads are open to loopback peers; others need `Authorization: Bearer <token>`
(admin.token_file or admin.token_env). SIGINT or SIGTERM stops the daemon
gracefully (waiting at most `shutdown_timeout`).";

const CHECK_HELP: &str = "\
Example:
  ippool check -c examples/loopback.toml

Prints the effective config as TOML (defaults filled in; the admin token is never
printed) and exits 0. On an error, prints it with the file, line, column and key
path (e.g. `ippool.toml:7:3: rules.clients.deny[1]: ...`) and exits 2.";

const RULES_CHECK_HELP: &str = "\
Example:
  ippool rules check -c examples/loopback.toml --set clients 10.1.2.3 10.9.9.9 ::1

Prints one line per address: the address, `allow` or `deny`, and what decided
(`allow list: RULE`, `deny list: RULE` or `default`). Works offline: no daemon
is needed and the admin token is not read.
Exit status: 0 if every address is allowed, 1 if any is denied, 2 on a bad config,
unknown set or bad address (like grep: usable in scripts).";

const LOGSCAN_HELP: &str = "\
Examples:
  ippool logscan access.log --format '$remote_addr [$time_local] \"$request\" $status up=$upstream_addr us=$upstream_status urt=$upstream_response_time'
  ippool logscan access.log --nginx-conf /etc/nginx/nginx.conf --format pool --address server_port --json

Prints one row per pool address, most requests first: requests, 2xx/3xx/4xx/5xx,
failures (statuses in --blocked-statuses, as the daemon's health tracking counts them),
failure percent and mean time (upstream response time for upstream_addr, request time
otherwise). A progress bar shows on stderr when it is a terminal. Malformed lines are
counted and the first few shown on stderr. See examples/nginx-monitor.toml.
Exit status: 0 success, 1 unreadable log, 2 bad arguments.";

/// The command line.
#[derive(Debug, Parser)]
#[command(name = "ippool", version, about = ABOUT, after_help = MAIN_HELP)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: admin API, metrics and rule sets.
    #[command(after_help = SERVE_HELP)]
    Serve(ConfigArg),
    /// Validate a config file and print the effective configuration.
    #[command(after_help = CHECK_HELP)]
    Check(ConfigArg),
    /// Work with the rule sets of a config file.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Summarise an nginx access log per pool address.
    #[command(after_help = LOGSCAN_HELP)]
    Logscan(LogscanArgs),
    /// Bans of misbehaving clients (a client of the running daemon).
    #[command(subcommand)]
    Bans(BansCommand),
    /// Pools and their addresses' health (a client of the running daemon).
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Keys of the registration channel: list, add, revoke (a client of
    /// the running daemon).
    #[command(subcommand)]
    Keys(apicmd::KeysCommand),
    /// Ingress backends: list, drain, undrain (a client of the running
    /// daemon).
    #[command(subcommand)]
    Backends(apicmd::BackendsCommand),
    /// Write a key pair for a backend agent (or an admin) of the
    /// registration channel.
    #[command(
        after_help = "Example:\n  ippool keygen --id web001 --dir keys\n  cp keys/web001.pub /etc/ippool/keys/   # the proxy's registry.keys_dir"
    )]
    Keygen(agentcmd::KeygenArgs),
    /// Register a backend with the proxy and keep it registered (a sidecar
    /// for backends in any language); SIGTERM drains and deregisters.
    #[command(
        after_help = "Example:\n  ippool agent --proxy ws://127.0.0.1:3042 --id web001 --key keys/web001.key \\\n    --service 127.0.0.1:8080 --route example.com/ --route '*.example.com/api'"
    )]
    Agent(agentcmd::AgentArgs),
}

const API_HELP: &str = "\
The daemon's admin API is at --admin (env IPPOOL_ADMIN, default
http://127.0.0.1:9095); changes need the admin token in IPPOOL_ADMIN_TOKEN.
Prints a table, or the API's JSON with --json. Exit status: 0 success,
1 refused or unreachable, 2 bad arguments.";

#[derive(Debug, Subcommand)]
enum BansCommand {
    /// Active bans of every rule set.
    #[command(after_help = API_HELP)]
    List {
        #[command(flatten)]
        api: client::ApiArgs,
    },
    /// Lift a ban.
    #[command(after_help = API_HELP)]
    Lift {
        #[command(flatten)]
        api: client::ApiArgs,
        /// The rule set.
        #[arg(long, value_name = "NAME")]
        set: String,
        /// The banned client key (an address, or an IPv6 network).
        #[arg(value_name = "RULE")]
        rule: String,
    },
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// The pools (egress, nginx, l4) and their addresses' state.
    #[command(after_help = API_HELP)]
    Show {
        #[command(flatten)]
        api: client::ApiArgs,
        /// Only this pool.
        #[arg(value_name = "POOL")]
        pool: Option<String>,
        /// Only this address.
        #[arg(long, value_name = "ADDR")]
        ip: Option<String>,
    },
}

#[derive(Debug, Args)]
struct LogscanArgs {
    /// The access log.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// `combined`, `main`, an nginx log_format string, or the name of a
    /// log_format declared in --nginx-conf.
    #[arg(long, default_value = "combined", value_name = "FORMAT")]
    format: String,
    /// Which log variable names the pool address.
    #[arg(long, value_enum, default_value_t = logscan::AddressArg::UpstreamAddr)]
    address: logscan::AddressArg,
    /// nginx configuration: named log_formats, and the port → address map
    /// for `--address server_port`.
    #[arg(long, value_name = "FILE")]
    nginx_conf: Option<PathBuf>,
    /// Statuses counted as failures.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "403,429",
        value_name = "LIST"
    )]
    blocked_statuses: Vec<u16>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum RulesCommand {
    /// Decide about addresses with a rule set, offline.
    #[command(after_help = RULES_CHECK_HELP)]
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// The rule set: the NAME of a `[rules.NAME]` section.
        #[arg(long, value_name = "NAME")]
        set: String,
        /// Addresses to check (IPv4 or IPv6).
        #[arg(required = true, value_name = "ADDR")]
        addrs: Vec<String>,
    },
    /// Rules of the running daemon: every set, or every rule of one.
    #[command(after_help = API_HELP)]
    List {
        #[command(flatten)]
        api: client::ApiArgs,
        /// One set.
        #[arg(long, value_name = "NAME")]
        set: Option<String>,
    },
    /// Add a rule to the running daemon (durable; `--ttl` to expire).
    #[command(after_help = API_HELP)]
    Add {
        #[command(flatten)]
        api: client::ApiArgs,
        /// The rule set.
        #[arg(long, value_name = "NAME")]
        set: String,
        /// `allow` or `deny`.
        #[arg(long, value_name = "LIST", default_value = "deny")]
        list: String,
        /// Expire after this long (`"1h"`, `"30m"`).
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// The rule: `10.0.0.1`, `10.0.0.0/8`, `10.0.0.1-10.0.0.9`.
        #[arg(value_name = "RULE")]
        rule: String,
    },
    /// Remove a rule added at run time.
    #[command(after_help = API_HELP)]
    Remove {
        #[command(flatten)]
        api: client::ApiArgs,
        /// The rule set.
        #[arg(long, value_name = "NAME")]
        set: String,
        /// `allow` or `deny`.
        #[arg(long, value_name = "LIST", default_value = "deny")]
        list: String,
        /// The rule.
        #[arg(value_name = "RULE")]
        rule: String,
    },
    /// Export what a rule set denies as an nftables script, for block lists
    /// too large for a socket filter or host-wide enforcement
    /// (`nft -f FILE` loads it). Rules of the config file only; the live
    /// set, runtime rules and bans included, is at
    /// `GET /api/rules/{set}/export`.
    #[command(after_help = RULES_EXPORT_HELP)]
    Export {
        #[command(flatten)]
        config: ConfigArg,
        /// The rule set: the NAME of a `[rules.NAME]` section.
        #[arg(long, value_name = "NAME")]
        set: String,
        /// The output format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Nft)]
        format: ExportFormat,
        /// The nftables table name.
        #[arg(long, default_value = "ippool", value_name = "NAME")]
        table: String,
        /// Apply only to these TCP destination ports (comma-separated);
        /// default: all traffic to the host.
        #[arg(long, value_delimiter = ',', value_name = "PORTS")]
        ports: Vec<u16>,
    },
}

/// Formats of `rules export`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ExportFormat {
    /// An nftables script (`table inet NAME` with interval sets).
    Nft,
}

const RULES_EXPORT_HELP: &str = "Example:
  ippool rules export -c examples/loopback.toml --set clients --ports 3128 > ippool.nft
  nft -f ippool.nft";

#[derive(Debug, Args)]
struct ConfigArg {
    /// The config file (TOML).
    #[arg(short, long, value_name = "FILE")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match cli.command {
        Command::Serve(arg) => serve_cmd(&arg),
        Command::Check(arg) => check_cmd(&arg),
        Command::Rules(RulesCommand::Check { config, set, addrs }) => {
            rules_check_cmd(&config, &set, &addrs)
        }
        Command::Rules(RulesCommand::Export {
            config,
            set,
            format: ExportFormat::Nft,
            table,
            ports,
        }) => rules_export_cmd(&config, &set, table, ports),
        Command::Rules(RulesCommand::List { api, set }) => api_cmd(&api, |api| {
            let path = set.as_ref().map_or("/api/rules".to_owned(), |s| {
                format!("/api/rules/{}", client::encode(s))
            });
            let v = client::call(api, "GET", &path, None)?;
            Ok(match set {
                None => {
                    let rows: Vec<Vec<String>> = v["sets"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|s| {
                            ["name", "default", "allow", "deny"]
                                .iter()
                                .map(|k| client::cell(&s[*k]))
                                .collect()
                        })
                        .collect();
                    (
                        v.clone(),
                        client::table(&["set", "default", "allow", "deny"], &rows),
                    )
                }
                Some(_) => {
                    let mut rows = Vec::new();
                    for list in ["allow", "deny"] {
                        for e in v[list].as_array().into_iter().flatten() {
                            rows.push(vec![
                                list.to_owned(),
                                client::cell(&e["rule"]),
                                client::cell(&e["source"]),
                                client::cell(&e["expires_in_seconds"]),
                            ]);
                        }
                    }
                    (
                        v.clone(),
                        client::table(&["list", "rule", "source", "expires_in_s"], &rows),
                    )
                }
            })
        }),
        Command::Rules(RulesCommand::Add {
            api,
            set,
            list,
            ttl,
            rule,
        }) => api_cmd(&api, |api| {
            let mut body = serde_json::json!({ "rule": rule });
            if let Some(t) = &ttl {
                body["ttl"] = t.clone().into();
            }
            let path = format!(
                "/api/rules/{}/{}",
                client::encode(&set),
                client::encode(&list)
            );
            let v = client::call(api, "POST", &path, Some(&body))?;
            let text = format!(
                "{} {} to {set}.{list}\n",
                if v["changed"] == true {
                    "added"
                } else {
                    "already had"
                },
                client::cell(&v["rule"])
            );
            Ok((v, text))
        }),
        Command::Rules(RulesCommand::Remove {
            api,
            set,
            list,
            rule,
        }) => api_cmd(&api, |api| {
            let path = format!(
                "/api/rules/{}/{}?rule={}",
                client::encode(&set),
                client::encode(&list),
                client::encode(&rule)
            );
            let v = client::call(api, "DELETE", &path, None)?;
            Ok((v, format!("removed {rule} from {set}.{list}\n")))
        }),
        Command::Bans(BansCommand::List { api }) => api_cmd(&api, |api| {
            let v = client::call(api, "GET", "/api/bans", None)?;
            let rows: Vec<Vec<String>> = v["bans"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    ["set", "rule", "remaining_seconds", "times", "offense"]
                        .iter()
                        .map(|k| client::cell(&b[*k]))
                        .collect()
                })
                .collect();
            let text = client::table(&["set", "rule", "remaining_s", "times", "offense"], &rows);
            Ok((v, text))
        }),
        Command::Bans(BansCommand::Lift { api, set, rule }) => api_cmd(&api, |api| {
            let path = format!(
                "/api/bans/{}?rule={}",
                client::encode(&set),
                client::encode(&rule)
            );
            let v = client::call(api, "DELETE", &path, None)?;
            Ok((v, format!("lifted the ban of {rule} in {set}\n")))
        }),
        Command::Pool(PoolCommand::Show { api, pool, ip }) => api_cmd(&api, |api| {
            let mut q = Vec::new();
            if let Some(p) = &pool {
                q.push(format!("pool={}", client::encode(p)));
            }
            if let Some(i) = &ip {
                q.push(format!("ip={}", client::encode(i)));
            }
            q.push("recent=0".into());
            let v = client::call(api, "GET", &format!("/probe?{}", q.join("&")), None)?;
            let mut rows = Vec::new();
            for p in v["pools"].as_array().into_iter().flatten() {
                if p["addresses"].as_array().is_none_or(Vec::is_empty) {
                    let mut row = vec![client::cell(&p["name"]), client::cell(&p["kind"])];
                    row.extend(std::iter::repeat_n("-".to_owned(), 6));
                    rows.push(row);
                }
                for a in p["addresses"].as_array().into_iter().flatten() {
                    let addr = match a["port"].as_u64() {
                        Some(port) => format!("{}:{port}", client::cell(&a["ip"])),
                        None => client::cell(&a["ip"]),
                    };
                    rows.push(vec![
                        client::cell(&p["name"]),
                        client::cell(&p["kind"]),
                        addr,
                        client::cell(&a["state"]),
                        client::cell(&a["counters"]["successes"]),
                        client::cell(&a["counters"]["failures"]),
                        client::cell(&a["leases"]),
                        client::cell(&a["remaining_seconds"]),
                    ]);
                }
            }
            let text = client::table(
                &[
                    "pool",
                    "kind",
                    "address",
                    "state",
                    "ok",
                    "failed",
                    "leases",
                    "benched_for_s",
                ],
                &rows,
            );
            Ok((v, text))
        }),
        Command::Keys(c) => api_cmd(c.api(), |_| c.run()),
        Command::Backends(c) => api_cmd(c.api(), |_| c.run()),
        Command::Logscan(args) => logscan_cmd(args),
        Command::Keygen(a) => agentcmd::keygen(&a),
        Command::Agent(a) => agentcmd::agent(&a),
    }
}

/// Runs one API client command: prints its table, or its JSON with --json.
fn api_cmd(
    api: &client::ApiArgs,
    f: impl FnOnce(&client::ApiArgs) -> Result<(serde_json::Value, String), client::ClientError>,
) -> ExitCode {
    match f(api) {
        Ok((json, text)) => {
            if api.json {
                print_out(&format!("{json:#}\n"))
            } else {
                print_out(&text)
            }
        }
        Err(e) => fail(e.exit_code(), e),
    }
}

fn rules_export_cmd(arg: &ConfigArg, set: &str, table: String, ports: Vec<u16>) -> ExitCode {
    let loaded = match load(arg, config::Scope::Offline) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let Some(policy) = loaded.rules.get(set) else {
        let known: Vec<&str> = loaded.rules.names().collect();
        return fail(
            2,
            format_args!("no rule set `{set}` (sets: {})", known.join(", ")),
        );
    };
    let opts = gateway::guard::NftOptions { table, ports };
    match policy.read(|p| gateway::guard::nft_script(p, std::time::Instant::now(), &opts)) {
        Ok(text) => print_out(&text),
        Err(e) => fail(1, e),
    }
}

fn logscan_cmd(args: LogscanArgs) -> ExitCode {
    let opts = logscan::Options {
        file: args.file,
        format: args.format,
        address: args.address,
        nginx_conf: args.nginx_conf,
        blocked_statuses: args.blocked_statuses,
        json: args.json,
    };
    match logscan::run(&opts) {
        Ok(text) => print_out(&text),
        Err(e) => fail(e.exit_code(), e),
    }
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}

fn load(arg: &ConfigArg, scope: config::Scope) -> Result<config::Loaded, ExitCode> {
    config::load(&arg.config, scope).map_err(|e| fail(2, e))
}

fn serve_cmd(arg: &ConfigArg) -> ExitCode {
    let loaded = match load(arg, config::Scope::Full) {
        Ok(l) => l,
        Err(code) => return code,
    };
    match serve::run(loaded) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            fail(1, e)
        }
    }
}

fn check_cmd(arg: &ConfigArg) -> ExitCode {
    let loaded = match load(arg, config::Scope::Full) {
        Ok(l) => l,
        Err(code) => return code,
    };
    match loaded.effective_toml() {
        Ok(text) => print_out(&text),
        Err(e) => fail(1, format_args!("cannot print the effective config: {e}")),
    }
}

fn rules_check_cmd(arg: &ConfigArg, set: &str, addrs: &[String]) -> ExitCode {
    let loaded = match load(arg, config::Scope::Offline) {
        Ok(l) => l,
        Err(code) => return code,
    };
    if loaded.rules.get(set).is_none() {
        let known: Vec<&str> = loaded.rules.names().collect();
        let known = if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        };
        return fail(
            2,
            format_args!(
                "{}: no rule set `{set}` (known: {known})",
                arg.config.display()
            ),
        );
    }
    let mut ips = Vec::with_capacity(addrs.len());
    for a in addrs {
        match a.trim().parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => return fail(2, format_args!("`{a}` is not an IPv4 or IPv6 address")),
        }
    }
    let reports: Vec<_> = ips
        .into_iter()
        .filter_map(|ip| loaded.rules.check(set, ip))
        .collect();
    let width = reports
        .iter()
        .map(|r| r.ip.to_string().len())
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for r in &reports {
        text.push_str(&format!(
            "{:<width$}  {:<5}  {}\n",
            r.ip.to_string(),
            r.verdict,
            r.reason_text()
        ));
    }
    let code = print_out(&text);
    if code != ExitCode::SUCCESS {
        return code;
    }
    if reports.iter().all(|r| r.is_allowed()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Prints to stdout; a closed pipe is not worth a panic.
fn print_out(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(1, format_args!("cannot write to stdout: {e}")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
