//! `posfleet-bundle.toml`, the manifest at the root of every bundle.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::{Error, Result};

pub const MANIFEST_FILE: &str = "posfleet-bundle.toml";
/// Largest manifest read from an archive.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
/// The one name of an `agent` bundle: a till runs one agent.
pub const AGENT_BUNDLE_NAME: &str = "posfleet-agent";
/// Where an `agent` bundle holds the agent's executable, relative to its
/// root.
pub const AGENT_EXECUTABLE: &str = "bin/posfleet-agent";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The point-of-sale software.
    Software,
    /// Product, price and promotion data of one store.
    Catalog,
    /// The agent itself (`posfleet-agent`), run by its launcher.
    Agent,
}

impl Kind {
    /// The word the manifest, the TUF target and the control plane use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Software => "software",
            Kind::Catalog => "catalog",
            Kind::Agent => "agent",
        }
    }
}

/// A command the agent runs, with a time limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    /// Program and arguments, relative to the unpacked bundle.
    pub command: Vec<String>,
    pub timeout_seconds: u64,
    /// Extra attempts after a failure (health checks).
    #[serde(default)]
    pub retries: u32,
    /// Health checks only: also run every this many seconds while the
    /// version runs, reported as signals (it never rolls back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_seconds: Option<u64>,
}

/// Longest `restart_delay_seconds` of a service.
pub const MAX_RESTART_DELAY_SECONDS: u64 = 300;
/// Range of a health check's `interval_seconds`.
pub const HEALTH_CHECK_INTERVAL_SECONDS: std::ops::RangeInclusive<u64> = 5..=86_400;

/// The program the agent keeps running while this version is the active
/// one (software bundles only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Program and arguments, relative to the unpacked bundle.
    pub command: Vec<String>,
    /// Pause before the program is started again after it exited; longer
    /// after repeated quick crashes.
    #[serde(default = "default_restart_delay")]
    pub restart_delay_seconds: u64,
}

fn default_restart_delay() -> u64 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: semver::Version,
    pub kind: Kind,
    /// Hardware models the bundle may be installed on; `["*"]` for any.
    pub hardware: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_activate: Option<Hook>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<Hook>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Service>,
}

impl Manifest {
    /// Parses and checks a manifest; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest> {
        let error = |message: String| Error::Manifest {
            path: path.to_path_buf(),
            message,
        };
        let manifest: Manifest =
            toml::from_str(text).map_err(|e| error(e.message().to_string()))?;
        let name_ok = !manifest.name.is_empty()
            && manifest.name.len() <= 64
            && manifest
                .name
                .starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && manifest
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !name_ok {
            return Err(error(format!(
                "name `{}` must be 1 to 64 lowercase letters, digits or '-'",
                manifest.name
            )));
        }
        if manifest.hardware.is_empty()
            || manifest
                .hardware
                .iter()
                .any(|h| h.is_empty() || h.len() > 64)
        {
            return Err(error(
                "hardware must list models (1 to 64 bytes each), or \"*\" for any".into(),
            ));
        }
        // A catalog is data: nothing of it runs on the till.
        if manifest.kind == Kind::Catalog
            && (manifest.pre_activate.is_some()
                || manifest.health_check.is_some()
                || manifest.service.is_some())
        {
            return Err(error(
                "a catalog bundle is data and carries no hooks (pre_activate, health_check) or service"
                    .into(),
            ));
        }
        // An agent confirms itself (it reaches the control plane and reports
        // healthy); nothing else of it runs, and a till runs one agent.
        if manifest.kind == Kind::Agent {
            if manifest.pre_activate.is_some()
                || manifest.health_check.is_some()
                || manifest.service.is_some()
            {
                return Err(error(
                    "an agent bundle confirms itself and carries no hooks (pre_activate, health_check) or service"
                        .into(),
                ));
            }
            if manifest.name != AGENT_BUNDLE_NAME {
                return Err(error(format!(
                    "an agent bundle is named `{AGENT_BUNDLE_NAME}`, not `{}`",
                    manifest.name
                )));
            }
        }
        for (field, hook) in [
            ("pre_activate", &manifest.pre_activate),
            ("health_check", &manifest.health_check),
        ] {
            if let Some(hook) = hook {
                if hook.command.is_empty() || hook.command[0].is_empty() {
                    return Err(error(format!("{field}.command must name a program")));
                }
                if !(1..=3600).contains(&hook.timeout_seconds) {
                    return Err(error(format!("{field}.timeout_seconds must be 1 to 3600")));
                }
                if hook.retries > 10 {
                    return Err(error(format!("{field}.retries must be at most 10")));
                }
                match hook.interval_seconds {
                    Some(_) if field != "health_check" => {
                        return Err(error(format!(
                            "{field}.interval_seconds: only a health check runs periodically"
                        )));
                    }
                    Some(seconds) if !HEALTH_CHECK_INTERVAL_SECONDS.contains(&seconds) => {
                        return Err(error(format!(
                            "{field}.interval_seconds must be {} to {}",
                            HEALTH_CHECK_INTERVAL_SECONDS.start(),
                            HEALTH_CHECK_INTERVAL_SECONDS.end()
                        )));
                    }
                    _ => {}
                }
            }
        }
        if let Some(service) = &manifest.service {
            if service.command.is_empty() || service.command[0].is_empty() {
                return Err(error("service.command must name a program".into()));
            }
            if !(1..=MAX_RESTART_DELAY_SECONDS).contains(&service.restart_delay_seconds) {
                return Err(error(format!(
                    "service.restart_delay_seconds must be 1 to {MAX_RESTART_DELAY_SECONDS}"
                )));
            }
        }
        Ok(manifest)
    }

    /// True when the bundle may be installed on `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.hardware.iter().any(|h| h == "*" || h == model)
    }

    /// The target name in the repository: `<name>/<version>`.
    pub fn target_name(&self) -> String {
        format!("{}/{}", self.name, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest> {
        Manifest::parse(text, Path::new("posfleet-bundle.toml"))
    }

    #[test]
    fn manifests_are_checked() {
        let good = r#"
            name = "pos-app"
            version = "1.1.0"
            kind = "software"
            hardware = ["pos-x1"]
            [health_check]
            command = ["bin/pos-app", "--health"]
            timeout_seconds = 10
            retries = 2
        "#;
        let m = parse(good).unwrap();
        assert_eq!(m.target_name(), "pos-app/1.1.0");
        assert!(m.allows("pos-x1") && !m.allows("pos-x2"));
        for bad in [
            good.replace("1.1.0", "1.1"),
            good.replace("pos-app", "Pos App"),
            good.replace("software", "firmware"),
            good.replace("software", "catalog"),
            good.replace("[\"pos-x1\"]", "[]"),
            good.replace("timeout_seconds = 10", "timeout_seconds = 0"),
            good.replace("retries = 2", "retries = 2\nshell = true"),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_service_and_a_periodic_health_check_are_optional_and_bounded() {
        let base =
            "name = \"pos-app\"\nversion = \"1.0.0\"\nkind = \"software\"\nhardware = [\"*\"]\n";
        let check =
            "[health_check]\ncommand = [\"bin/pos-app\", \"health\"]\ntimeout_seconds = 10\n";
        let m = parse(&format!(
            "{base}[service]\ncommand = [\"bin/pos-app\", \"run\"]\n{check}interval_seconds = 60\n"
        ))
        .unwrap();
        let service = m.service.unwrap();
        assert_eq!(service.command, ["bin/pos-app", "run"]);
        assert_eq!(service.restart_delay_seconds, 1, "the default");
        assert_eq!(m.health_check.unwrap().interval_seconds, Some(60));
        let delayed = parse(&format!(
            "{base}[service]\ncommand = [\"run\"]\nrestart_delay_seconds = 300\n"
        ))
        .unwrap();
        assert_eq!(delayed.service.unwrap().restart_delay_seconds, 300);
        assert_eq!(parse(base).unwrap().service, None);
        for (bad, reason) in [
            (
                format!("{base}[service]\ncommand = []\n"),
                "service.command must name a program",
            ),
            (
                format!("{base}[service]\ncommand = [\"run\"]\nrestart_delay_seconds = 0\n"),
                "service.restart_delay_seconds must be 1 to 300",
            ),
            (
                format!("{base}[service]\ncommand = [\"run\"]\nrestart_delay_seconds = 301\n"),
                "service.restart_delay_seconds must be 1 to 300",
            ),
            (
                format!("{base}[service]\ncommand = [\"run\"]\nuser = \"root\"\n"),
                "unknown field `user`",
            ),
            (
                format!("{base}{check}interval_seconds = 4\n"),
                "health_check.interval_seconds must be 5 to 86400",
            ),
            (
                format!(
                    "{base}[pre_activate]\ncommand = [\"x\"]\ntimeout_seconds = 5\ninterval_seconds = 60\n"
                ),
                "only a health check runs periodically",
            ),
            (
                format!(
                    "{}[service]\ncommand = [\"run\"]\n",
                    base.replace("software", "catalog")
                ),
                "carries no hooks",
            ),
        ] {
            let err = parse(&bad).unwrap_err().to_string();
            assert!(err.contains(reason), "{bad}: {err}");
        }
    }

    #[test]
    fn agent_bundles_are_named_posfleet_agent_and_carry_no_hooks() {
        let agent = "name = \"posfleet-agent\"\nversion = \"2.0.0\"\nkind = \"agent\"\nhardware = [\"*\"]\n";
        let m = parse(agent).unwrap();
        assert_eq!((m.kind, m.kind.as_str()), (Kind::Agent, "agent"));
        for bad in [
            agent.replace("posfleet-agent", "pos-app"),
            format!("{agent}[health_check]\ncommand = [\"x\"]\ntimeout_seconds = 5\n"),
            format!("{agent}[pre_activate]\ncommand = [\"x\"]\ntimeout_seconds = 5\n"),
            format!("{agent}[service]\ncommand = [\"x\"]\n"),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
        // Every kind's word is the one serde reads and writes.
        for kind in [Kind::Software, Kind::Catalog, Kind::Agent] {
            let word = serde_json::to_value(kind).unwrap();
            assert_eq!(word, kind.as_str());
        }
    }
}
