//! `posfleet-bundle.toml`, the manifest at the root of every bundle.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::{Error, Result};

pub const MANIFEST_FILE: &str = "posfleet-bundle.toml";
/// Largest manifest read from an archive.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The point-of-sale software.
    Software,
    /// Product, price and promotion data of one store.
    Catalog,
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
}
