//! Hot reload (SIGHUP, `POST /api/reload`): the config file is read and
//! validated again; an invalid file is refused with the reason and the
//! running config stays. Rule sets take their new config-file rules at once
//! (runtime rules and bans kept, one pointer swap for readers). Changes to
//! sections that own sockets or pools (listeners, pools, monitors, the
//! registry, a set's auto-blocking or rate limit) are reported as needing a
//! restart: they are not applied half-way. The registry's key store is
//! read again (added `.pub` files accepted, removed ones refused and their
//! connections closed).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

use crate::config::{self, Config};
use crate::rules::RuleSets;

/// What a reload did.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Report {
    /// Rule sets whose config-file rules were replaced.
    pub reloaded: Vec<String>,
    /// Sections that changed but take effect only after a restart.
    pub restart_required: Vec<String>,
    /// Keys in the registry's key store after the reload (no registry:
    /// absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<usize>,
}

/// Re-reads the config file on demand.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    rules: Arc<RuleSets>,
    store: store::Store,
    registry: Option<registry::Registry>,
    current: Mutex<(Config, Arc<str>)>,
}

impl Reloader {
    /// A reloader of the config at `path`, now running `config`.
    pub fn new(
        path: PathBuf,
        config: Config,
        rules: Arc<RuleSets>,
        store: store::Store,
        registry: Option<registry::Registry>,
    ) -> Reloader {
        let json: Arc<str> = Arc::from(serde_json::to_string(&config).unwrap_or_default());
        Reloader {
            path,
            rules,
            store,
            registry,
            current: Mutex::new((config, json)),
        }
    }

    /// The running config as JSON (for `/config`).
    pub fn config_json(&self) -> Arc<str> {
        Arc::clone(
            &self
                .current
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .1,
        )
    }

    /// Reloads; blocking (file and store reads): call off the async workers.
    pub fn reload(&self) -> Result<Report, String> {
        let loaded = config::load(&self.path, config::Scope::Full).map_err(|e| e.to_string())?;
        let runtime = self.store.rules().map_err(|e| e.to_string())?;
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let old = serde_json::to_value(&cur.0).map_err(|e| e.to_string())?;
        let new = serde_json::to_value(&loaded.config).map_err(|e| e.to_string())?;
        let mut report = Report {
            reloaded: Vec::new(),
            restart_required: Vec::new(),
            keys: None,
        };
        if let Some(r) = &self.registry {
            r.reload_keys()
                .map_err(|e| format!("registry.keys_dir: {e}"))?;
            report.keys = Some(r.keys().len());
        }
        let empty = serde_json::Map::new();
        let obj = |v: &serde_json::Value, k: &str| {
            v.get(k)
                .and_then(|x| x.as_object())
                .cloned()
                .unwrap_or_else(|| empty.clone())
        };
        // Every top-level section but rules: compared per entry.
        let mut keys: Vec<String> = old
            .as_object()
            .into_iter()
            .chain(new.as_object())
            .flat_map(|m| m.keys().cloned())
            .collect();
        keys.sort();
        keys.dedup();
        for k in keys.iter().filter(|k| *k != "rules") {
            if old.get(k) == new.get(k) {
                continue;
            }
            match (old.get(k), new.get(k)) {
                (Some(serde_json::Value::Object(a)), Some(serde_json::Value::Object(b)))
                    if matches!(k.as_str(), "pools" | "egress" | "l4" | "monitor") =>
                {
                    let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
                    names.sort();
                    names.dedup();
                    for n in names {
                        if a.get(n) != b.get(n) {
                            report.restart_required.push(format!("{k}.{n}"));
                        }
                    }
                }
                _ => report.restart_required.push(k.clone()),
            }
        }
        // Rules: new base rules now; structure changes need a restart.
        let (old_rules, new_rules) = (obj(&old, "rules"), obj(&new, "rules"));
        let mut names: Vec<&String> = old_rules.keys().chain(new_rules.keys()).collect();
        names.sort();
        names.dedup();
        for n in names {
            match (old_rules.get(n), new_rules.get(n)) {
                (Some(a), Some(b)) => {
                    for part in ["default", "autoblock", "rate_limit", "kernel_filter"] {
                        if a.get(part) != b.get(part) {
                            report.restart_required.push(format!("rules.{n}.{part}"));
                        }
                    }
                    let base = loaded.rules.get(n).map(|p| p.read(Clone::clone));
                    if let Some(base) = base
                        && self.rules.reload_base(n, base, &runtime)
                    {
                        report.reloaded.push(n.clone());
                    }
                }
                _ => report.restart_required.push(format!("rules.{n}")),
            }
        }
        let json: Arc<str> = Arc::from(serde_json::to_string(&loaded.config).unwrap_or_default());
        *cur = (loaded.config, json);
        Ok(report)
    }
}
