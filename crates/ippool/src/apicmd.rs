//! `ippool keys …` and `ippool backends …`: clients of the admin API for
//! the registration channel's keys and the ingress backends.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::{self, ApiArgs, ClientError};

/// What a command prints: the API's JSON and the human text.
pub type Printed = Result<(Value, String), ClientError>;

/// `ippool keys`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// The keys of the registration channel.
    #[command(after_help = crate::API_HELP)]
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Add a key from a `.pub` file written by `ippool keygen` (its id is
    /// the file name; role and allow come from the file unless given).
    #[command(after_help = KEYS_ADD_HELP)]
    Add {
        #[command(flatten)]
        api: ApiArgs,
        /// The public key file, `ID.pub`.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// `agent` or `admin` (default: the file's `role`).
        #[arg(long, value_name = "ROLE")]
        role: Option<String>,
        /// Addresses an agent may register (comma-separated: `peer`, an
        /// address, range or subnet; default: the file's `allow`).
        #[arg(long, value_delimiter = ',', value_name = "LIST")]
        allow: Option<Vec<String>>,
    },
    /// Revoke a key: its connection closes and its services go at once.
    #[command(after_help = crate::API_HELP)]
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        /// The key id.
        #[arg(value_name = "ID")]
        id: String,
    },
}

const KEYS_ADD_HELP: &str = "Example:
  ippool keygen --id web002 --dir keys
  IPPOOL_ADMIN_TOKEN=… ippool keys add keys/web002.pub --allow peer,10.0.0.0/24

The key is written to the daemon's registry.keys_dir before the command
returns; the agent can connect at once.";

/// `ippool backends`.
#[derive(Debug, Subcommand)]
pub enum BackendsCommand {
    /// Every ingress backend: route, address, health, weight, drain state,
    /// traffic and latency.
    #[command(after_help = crate::API_HELP)]
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Only this ingress.
        #[arg(long, value_name = "NAME")]
        ingress: Option<String>,
    },
    /// Hold a backend out of rotation: no new requests, those in flight
    /// finish; it stays listed until `undrain`.
    #[command(after_help = crate::API_HELP)]
    Drain {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        backend: BackendArg,
    },
    /// Put a held or draining backend back in rotation.
    #[command(after_help = crate::API_HELP)]
    Undrain {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        backend: BackendArg,
    },
}

/// Which backend `drain` and `undrain` act on.
#[derive(Debug, clap::Args)]
pub struct BackendArg {
    /// The backend id.
    #[arg(value_name = "ID")]
    id: String,
    /// The ingress holding it (when several have this id).
    #[arg(long, value_name = "NAME")]
    ingress: Option<String>,
}

impl KeysCommand {
    /// The API arguments.
    pub fn api(&self) -> &ApiArgs {
        match self {
            KeysCommand::List { api }
            | KeysCommand::Add { api, .. }
            | KeysCommand::Revoke { api, .. } => api,
        }
    }

    /// Runs the command.
    pub fn run(&self) -> Printed {
        match self {
            KeysCommand::List { api } => {
                let v = client::call(api, "GET", "/api/keys", None)?;
                let rows: Vec<Vec<String>> = v["keys"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|k| {
                        let allow: Vec<String> = k["allow"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(client::cell)
                            .collect();
                        vec![
                            client::cell(&k["id"]),
                            client::cell(&k["role"]),
                            if allow.is_empty() {
                                "peer".to_owned()
                            } else {
                                allow.join(",")
                            },
                            client::cell(&k["public_key"]),
                        ]
                    })
                    .collect();
                let text = client::table(&["id", "role", "allow", "public_key"], &rows);
                Ok((v, text))
            }
            KeysCommand::Add {
                api,
                file,
                role,
                allow,
            } => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| ClientError::Input(format!("{}: {e}", file.display())))?;
                let entry = registry::KeyEntry::parse(file, &text)
                    .map_err(|e| ClientError::Input(e.to_string()))?;
                let role = role.clone().unwrap_or_else(|| entry.role.to_string());
                let allow = allow
                    .clone()
                    .unwrap_or_else(|| entry.allow.iter().map(ToString::to_string).collect());
                let body = json!({
                    "id": entry.id.to_string(),
                    "public_key": entry.public_key_text(),
                    "role": role,
                    "allow": allow,
                });
                let v = client::call(api, "POST", "/api/keys", Some(&body))?;
                let text = format!(
                    "added key {} ({})\n",
                    client::cell(&v["id"]),
                    client::cell(&v["role"])
                );
                Ok((v, text))
            }
            KeysCommand::Revoke { api, id } => {
                let path = format!("/api/keys/{}", client::encode(id));
                let v = client::call(api, "DELETE", &path, None)?;
                Ok((v, format!("revoked key {id}\n")))
            }
        }
    }
}

impl BackendsCommand {
    /// The API arguments.
    pub fn api(&self) -> &ApiArgs {
        match self {
            BackendsCommand::List { api, .. }
            | BackendsCommand::Drain { api, .. }
            | BackendsCommand::Undrain { api, .. } => api,
        }
    }

    /// Runs the command.
    pub fn run(&self) -> Printed {
        match self {
            BackendsCommand::List { api, ingress } => {
                let v = client::call(api, "GET", "/api/routes", None)?;
                let mut rows = Vec::new();
                for r in v["routes"].as_array().into_iter().flatten() {
                    if ingress
                        .as_ref()
                        .is_some_and(|i| r["ingress"] != *i.as_str())
                    {
                        continue;
                    }
                    for b in r["backends"].as_array().into_iter().flatten() {
                        let drain = if b["held"] == true {
                            "held"
                        } else if b["draining"] == true {
                            "draining"
                        } else {
                            "-"
                        };
                        let latency = b["latency_ms"]
                            .as_f64()
                            .map_or("-".to_owned(), |ms| format!("{ms:.1}"));
                        rows.push(vec![
                            client::cell(&r["ingress"]),
                            client::cell(&r["route"]),
                            client::cell(&b["id"]),
                            client::cell(&b["addr"]),
                            client::cell(&b["state"]),
                            client::cell(&b["weight"]),
                            drain.to_owned(),
                            client::cell(&b["in_flight"]),
                            client::cell(&b["requests"]),
                            client::cell(&b["failures"]),
                            latency,
                        ]);
                    }
                }
                let text = client::table(
                    &[
                        "ingress",
                        "route",
                        "backend",
                        "address",
                        "state",
                        "weight",
                        "drain",
                        "in_flight",
                        "requests",
                        "failures",
                        "latency_ms",
                    ],
                    &rows,
                );
                Ok((v, text))
            }
            BackendsCommand::Drain { api, backend } => set_held(api, backend, "drain"),
            BackendsCommand::Undrain { api, backend } => set_held(api, backend, "undrain"),
        }
    }
}

fn set_held(api: &ApiArgs, backend: &BackendArg, verb: &str) -> Printed {
    let id = &backend.id;
    let mut path = format!("/api/backends/{}/{verb}", client::encode(id));
    if let Some(i) = &backend.ingress {
        path.push_str(&format!("?ingress={}", client::encode(i)));
    }
    let v = client::call(api, "POST", &path, None)?;
    let text = match (verb, v["changed"] == true) {
        ("drain", true) => format!(
            "{id} drained: no new requests ({} in flight)\n",
            client::cell(&v["in_flight"])
        ),
        ("drain", false) => format!("{id} was already held\n"),
        (_, true) => format!("{id} back in rotation\n"),
        (_, false) => format!("{id} was not drained\n"),
    };
    Ok((v, text))
}
