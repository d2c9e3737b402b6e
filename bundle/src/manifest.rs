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
            && (manifest.pre_activate.is_some() || manifest.health_check.is_some())
        {
            return Err(error(
                "a catalog bundle is data and carries no hooks (pre_activate, health_check)".into(),
            ));
        }
        // An agent confirms itself (it reaches the control plane and reports
        // healthy); nothing else of it runs, and a till runs one agent.
        if manifest.kind == Kind::Agent {
            if manifest.pre_activate.is_some() || manifest.health_check.is_some() {
                return Err(error(
                    "an agent bundle confirms itself and carries no hooks (pre_activate, health_check)"
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
    fn agent_bundles_are_named_posfleet_agent_and_carry_no_hooks() {
        let agent = "name = \"posfleet-agent\"\nversion = \"2.0.0\"\nkind = \"agent\"\nhardware = [\"*\"]\n";
        let m = parse(agent).unwrap();
        assert_eq!((m.kind, m.kind.as_str()), (Kind::Agent, "agent"));
        for bad in [
            agent.replace("posfleet-agent", "pos-app"),
            format!("{agent}[health_check]\ncommand = [\"x\"]\ntimeout_seconds = 5\n"),
            format!("{agent}[pre_activate]\ncommand = [\"x\"]\ntimeout_seconds = 5\n"),
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
