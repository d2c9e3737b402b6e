//! Layered configuration, the same for both programs: a program's defaults,
//! then a TOML file, then `POSFLEET_<KEY>` environment variables, then
//! command-line flags, each layer overriding the ones before it.
//!
//! The environment variables a program reads are derived from its config
//! struct (the keys its defaults serialize to), so a new key is read from
//! the environment as soon as it exists, and only the program's own keys
//! are: `POSFLEET_CONFIG` and the CLI's `POSFLEET_TOKEN` are not settings.
//! A variable's value is read the way TOML reads a value (`true`, `30`,
//! `[printer, scanner]`), falling back to the text itself.

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::ffi::OsString;
use std::path::Path;

pub use crate::error::ConfigError;

/// The prefix of every setting's environment variable.
pub const ENV_PREFIX: &str = "POSFLEET_";

/// The name of a key's environment variable: `POSFLEET_<KEY>`.
pub fn env_var(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
}

/// The keys of config `C`: the fields its defaults serialize to.
pub fn keys<C: Default + Serialize>() -> Vec<String> {
    Figment::from(Serialized::defaults(C::default()))
        .data()
        .ok()
        .and_then(|mut profiles| profiles.remove(&Profile::Default))
        .map(|dict| dict.into_keys().collect())
        .unwrap_or_default()
}

/// The `POSFLEET_<KEY>` variables of an environment for the given keys.
struct EnvLayer {
    values: Dict,
}

/// How a value from the environment names its source in errors.
const ENV_SOURCE: &str = "environment variable";

impl EnvLayer {
    fn new(keys: &[String], env: impl IntoIterator<Item = (OsString, OsString)>) -> EnvLayer {
        let mut values = Dict::new();
        for (name, value) in env {
            let name = name.to_string_lossy();
            let name = name.trim();
            // Matched as figment's `Env::prefixed` does: case-insensitively.
            let Some(key) = name
                .get(..ENV_PREFIX.len())
                .filter(|prefix| prefix.eq_ignore_ascii_case(ENV_PREFIX))
                .map(|_| name[ENV_PREFIX.len()..].to_ascii_lowercase())
            else {
                continue;
            };
            if keys.contains(&key) {
                let value: Value = match value.to_string_lossy().parse() {
                    Ok(value) => value,
                    Err(never) => match never {},
                };
                values.insert(key, value);
            }
        }
        EnvLayer { values }
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_SOURCE)
            .interpolater(|_: &Profile, keys: &[&str]| env_var(&keys.join("_")))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

/// Config `C`: its defaults, then the TOML `file`, then the `POSFLEET_<KEY>`
/// variables of `env` (the process's, `std::env::vars_os()`, outside
/// tests), then `flags` (fields left out when not given). Not validated:
/// the program checks the values it loaded.
pub fn load<C>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (OsString, OsString)>,
    flags: &impl Serialize,
) -> Result<C, ConfigError>
where
    C: Default + Serialize + DeserializeOwned,
{
    let mut figment = Figment::from(Serialized::defaults(C::default()));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::new(
                "config",
                format!("{} is not a readable file", path.display()),
            ));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment
        .merge(EnvLayer::new(&keys::<C>(), env))
        .merge(Serialized::defaults(flags))
        .extract()
        .map_err(figment_error)
}

/// One line naming the key and where its bad value came from.
fn figment_error(error: figment::Error) -> ConfigError {
    let key = error
        .path
        .last()
        .cloned()
        .unwrap_or_else(|| "config".to_string());
    let source = match &error.metadata {
        Some(m) if m.name == ENV_SOURCE => format!(" (from {ENV_SOURCE} {})", env_var(&key)),
        Some(m) => format!(" (from {})", m.name),
        None => String::new(),
    };
    ConfigError::new(
        &key,
        format!("{}{source}", one_line(&error.kind.to_string())),
    )
}

/// Parser messages can quote the offending source over several lines; the
/// error is reported on one line without the quote.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with('|') && !l.contains(" | ") && !l.starts_with('^')
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::path::PathBuf;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        interval_seconds: u32,
        enabled: bool,
        names: Vec<String>,
        data_dir: PathBuf,
    }

    impl Default for Settings {
        fn default() -> Self {
            Settings {
                interval_seconds: 30,
                enabled: true,
                names: vec!["a".into()],
                data_dir: PathBuf::from("data"),
            }
        }
    }

    #[derive(Default, Serialize)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        interval_seconds: Option<u32>,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    fn load_env(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        load(None, env(pairs), &Flags::default())
    }

    #[test]
    fn env_keys_are_the_config_fields() {
        let mut keys = keys::<Settings>();
        keys.sort();
        assert_eq!(keys, ["data_dir", "enabled", "interval_seconds", "names"]);
        assert_eq!(env_var("interval_seconds"), "POSFLEET_INTERVAL_SECONDS");
    }

    #[test]
    fn each_layer_overrides_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(&file, "interval_seconds = 7\nenabled = false\n").unwrap();
        let vars = env(&[
            ("POSFLEET_INTERVAL_SECONDS", "8"),
            ("POSFLEET_NAMES", "[x, y]"),
            ("posfleet_data_dir", "/var/lib/x"),
            // Not settings: another program's, the config file's, unknown.
            ("POSFLEET_CONFIG", "/elsewhere.toml"),
            ("POSFLEET_TOKEN", "secret"),
            ("INTERVAL_SECONDS", "1"),
        ]);
        let loaded: Settings = load(Some(&file), vars.clone(), &Flags::default()).unwrap();
        assert_eq!(
            loaded,
            Settings {
                interval_seconds: 8,
                enabled: false,
                names: vec!["x".into(), "y".into()],
                data_dir: PathBuf::from("/var/lib/x"),
            }
        );
        let flags = Flags {
            interval_seconds: Some(9),
        };
        let loaded: Settings = load(Some(&file), vars, &flags).unwrap();
        assert_eq!(loaded.interval_seconds, 9);
        assert_eq!(load_env(&[]).unwrap(), Settings::default());
    }

    #[test]
    fn bad_values_name_their_key_and_source() {
        let err = load_env(&[("POSFLEET_INTERVAL_SECONDS", "soon")]).unwrap_err();
        assert_eq!(err.key, "interval_seconds");
        assert!(
            err.to_string().contains("POSFLEET_INTERVAL_SECONDS"),
            "{err}"
        );
        let err = load_env(&[("POSFLEET_ENABLED", "maybe")]).unwrap_err();
        assert_eq!(err.key, "enabled", "{err}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(&file, "interval_secs = 7\n").unwrap();
        let err = load::<Settings>(Some(&file), env(&[]), &Flags::default()).unwrap_err();
        assert!(err.to_string().contains("interval_secs"), "{err}");
        std::fs::write(&file, "interval_seconds = [\n").unwrap();
        let err = load::<Settings>(Some(&file), env(&[]), &Flags::default()).unwrap_err();
        assert!(!err.to_string().contains('\n'), "one line: {err}");
        let missing = dir.path().join("missing.toml");
        let err = load::<Settings>(Some(&missing), env(&[]), &Flags::default()).unwrap_err();
        assert_eq!(err.key, "config");
    }
}
