//! Layered configuration: defaults in code, then one TOML file, then `TERN_...` environment
//! variables (`__` separates nested keys: `TERN_MQTT__MAX_PACKET_SIZE`), then command-line flags.
//! A bad value stops start-up with an error that names the key, where it came from and what
//! was expected.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

/// `TERN_` variables that belong to the CLI, not to the server configuration.
const CLI_ENV_VARS: &[&str] = &[
    "server",
    "tenant",
    "token",
    "token_file",
    "output",
    "config",
];

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config file {path} does not exist")]
    MissingFile { path: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Loads `T` from its defaults, the optional TOML `file`, the environment and `flags` (a
/// serializable struct whose `None` fields are skipped), in that order of precedence.
pub fn load_config<T, F>(file: Option<&Path>, flags: &F) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
    F: Serialize,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::MissingFile {
                path: path.display().to_string(),
            });
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment
        .merge(Env::prefixed("TERN_").split("__").filter(|key| {
            !CLI_ENV_VARS
                .iter()
                .any(|v| key.as_str().eq_ignore_ascii_case(v))
        }))
        .merge(Serialized::defaults(flags));
    figment.extract().map_err(describe)
}

/// Turns figment's errors into one line per problem: key, source, what was wrong.
fn describe(errors: figment::Error) -> ConfigError {
    let lines: Vec<String> = errors
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let source = match &e.metadata {
                // Name the exact variable, which is what the operator has to fix.
                Some(m) if m.name.contains("environment") => {
                    format!(
                        "environment variable TERN_{}",
                        e.path.join("__").to_uppercase()
                    )
                }
                Some(m) => match &m.source {
                    Some(source) => format!("{} {source}", m.name),
                    None => m.name.to_string(),
                },
                None => "configuration".into(),
            };
            if key.is_empty() {
                format!("{} (from {source})", e.kind)
            } else {
                format!("key `{key}` (from {source}): {}", e.kind)
            }
        })
        .collect();
    ConfigError::Invalid(lines.join("; "))
}

#[cfg(test)]
// figment's test Jail fixes the closure's error type.
#[allow(clippy::result_large_err)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        port: u16,
        data_dir: String,
        nested: Nested,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Nested {
        size: u32,
    }

    impl Default for Sample {
        fn default() -> Self {
            Self {
                port: 1,
                data_dir: "./data".into(),
                nested: Nested { size: 7 },
            }
        }
    }

    impl Default for Nested {
        fn default() -> Self {
            Self { size: 7 }
        }
    }

    #[derive(Serialize, Default)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    }

    #[test]
    fn layers_apply_in_order_and_errors_name_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "tern.toml",
                "port = 2\ndata_dir = \"/srv\"\n[nested]\nsize = 9\n",
            )?;
            let path = Path::new("tern.toml");
            let c: Sample = load_config(Some(path), &Flags::default()).expect("load");
            assert_eq!(
                c,
                Sample {
                    port: 2,
                    data_dir: "/srv".into(),
                    nested: Nested { size: 9 }
                }
            );

            jail.set_env("TERN_PORT", "3");
            jail.set_env("TERN_NESTED__SIZE", "11");
            jail.set_env("TERN_SERVER", "http://ignored-cli-variable");
            let c: Sample = load_config(Some(path), &Flags::default()).expect("load");
            assert_eq!((c.port, c.nested.size), (3, 11));

            let c: Sample = load_config(Some(path), &Flags { port: Some(4) }).expect("load");
            assert_eq!(c.port, 4, "flags win over env");

            jail.set_env("TERN_PORT", "not-a-port");
            let err = load_config::<Sample, _>(Some(path), &Flags::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains("`port`") && err.contains("TERN_PORT"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "[nested]\nsise = 1\n")?;
            let err = load_config::<Sample, _>(Some(Path::new("bad.toml")), &Flags::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains("sise") && err.contains("nested"), "{err}");
            let err = load_config::<Sample, _>(Some(Path::new("nope.toml")), &Flags::default())
                .unwrap_err();
            assert!(matches!(err, ConfigError::MissingFile { .. }));
            Ok(())
        });
    }
}
