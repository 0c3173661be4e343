//! `--config FILE`: every daemon flag set from a TOML or JSON file.
//!
//! A file's keys are the flags' long names without the dashes (`data-dir`, `listen`; `data_dir`
//! is taken too), its values their values: strings, integers or booleans. The file becomes
//! command-line arguments placed before the real ones, so a flag given on the command line
//! overrides the file (clap keeps the last value of a flag). Unknown keys, and values that are
//! tables or arrays, are refused with the key named. A `null` (JSON) leaves a flag at its
//! default, so the JSON that `/config` serves (which leaves out `config` itself) can be fed
//! back as a file. `main` finds `--config` by parsing the command line alone first, where a
//! flag given twice is an error.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

/// Largest configuration file read.
const CONFIG_BYTES_MAX: u64 = 1 << 20;

/// The command line with the settings of the file `path` spliced in before the real
/// arguments. `flags` are the long names the daemon takes.
pub fn splice(args: Vec<OsString>, path: &Path, flags: &[String]) -> Result<Vec<OsString>> {
    let from_file = file_args(path, flags)?;
    let mut spliced = Vec::with_capacity(args.len() + from_file.len());
    let mut args = args.into_iter();
    spliced.extend(args.next());
    spliced.extend(from_file);
    spliced.extend(args);
    Ok(spliced)
}

/// The file's settings as `--key=value` arguments.
fn file_args(path: &Path, flags: &[String]) -> Result<Vec<OsString>> {
    let size =
        std::fs::metadata(path).with_context(|| format!("cannot read config file {}", path.display()))?.len();
    if size > CONFIG_BYTES_MAX {
        bail!("config file {} is {size} bytes; at most {CONFIG_BYTES_MAX} are read", path.display());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let settings = parse(path, &text)?;
    let mut args = Vec::with_capacity(settings.len());
    for (key, value) in settings {
        let flag = key.replace('_', "-");
        if flag == "config" || !flags.contains(&flag) {
            bail!(
                "config file {}: unknown key '{key}': keys are the daemon's flags without their dashes \
                 (see pyralog --help)",
                path.display()
            );
        }
        let value = match value {
            Setting::Text(text) => text,
            Setting::Default => continue,
            Setting::Unsupported(kind) => {
                bail!(
                    "config file {}: key '{key}' is {kind}; it takes one string, number or boolean",
                    path.display()
                )
            }
        };
        args.push(OsString::from(format!("--{flag}={value}")));
    }
    Ok(args)
}

enum Setting {
    Text(String),
    /// JSON null: the flag keeps its default.
    Default,
    Unsupported(&'static str),
}

/// The file's top-level keys and values, as TOML unless its name ends in `.json`.
fn parse(path: &Path, text: &str) -> Result<Vec<(String, Setting)>> {
    let where_ = || format!("config file {}", path.display());
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
        let value: serde_json::Value =
            serde_json::from_str(text).with_context(|| format!("{} is not valid JSON", where_()))?;
        let serde_json::Value::Object(map) = value else { bail!("{} must hold one JSON object", where_()) };
        return Ok(map
            .into_iter()
            .map(|(key, value)| {
                let setting = match value {
                    serde_json::Value::String(text) => Setting::Text(text),
                    serde_json::Value::Number(number) => Setting::Text(number.to_string()),
                    serde_json::Value::Bool(flag) => Setting::Text(flag.to_string()),
                    serde_json::Value::Null => Setting::Default,
                    serde_json::Value::Array(_) => Setting::Unsupported("an array"),
                    serde_json::Value::Object(_) => Setting::Unsupported("an object"),
                };
                (key, setting)
            })
            .collect());
    }
    let table: toml::Table = text.parse().map_err(|e| anyhow!("{} is not valid TOML: {e}", where_()))?;
    Ok(table
        .into_iter()
        .map(|(key, value)| {
            let setting = match value {
                toml::Value::String(text) => Setting::Text(text),
                toml::Value::Integer(number) => Setting::Text(number.to_string()),
                toml::Value::Float(number) => Setting::Text(number.to_string()),
                toml::Value::Boolean(flag) => Setting::Text(flag.to_string()),
                toml::Value::Datetime(_) => Setting::Unsupported("a date"),
                toml::Value::Array(_) => Setting::Unsupported("an array"),
                toml::Value::Table(_) => Setting::Unsupported("a table"),
            };
            (key, setting)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Vec<String> {
        ["data-dir", "listen", "auto-create-topics", "config", "shards"].map(String::from).to_vec()
    }

    /// The arguments a file makes, between the program's name and the command line's own.
    fn expand(file_name: &str, text: &str, rest: &[&str]) -> Result<Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name);
        std::fs::write(&path, text).unwrap();
        let mut args: Vec<OsString> = vec!["pyralog".into(), "--config".into(), path.clone().into()];
        args.extend(rest.iter().map(OsString::from));
        let spliced = splice(args, &path, &flags())?;
        assert_eq!(spliced[0], "pyralog");
        Ok(spliced
            .into_iter()
            .skip(1)
            .map(|a| a.into_string().unwrap())
            .take_while(|a| a != "--config")
            .collect())
    }

    #[test]
    fn toml_and_json_files_become_flags_before_the_command_line() {
        let toml = "data-dir = \"/var/lib/pyralog\"\nauto_create_topics = false\nshards = 2\n";
        let mut args = expand("node.toml", toml, &[]).unwrap();
        args.sort();
        assert_eq!(args, ["--auto-create-topics=false", "--data-dir=/var/lib/pyralog", "--shards=2"]);
        let json = r#"{"listen": "127.0.0.1:7000", "shards": null}"#;
        assert_eq!(expand("node.json", json, &[]).unwrap(), ["--listen=127.0.0.1:7000"]);
    }

    #[test]
    fn unknown_keys_and_nested_values_are_refused_by_name() {
        let error = expand("node.toml", "data-dri = \"x\"\n", &[]).unwrap_err().to_string();
        assert!(error.contains("unknown key 'data-dri'"), "{error}");
        let error = expand("node.toml", "[listen]\nhost = 1\n", &[]).unwrap_err().to_string();
        assert!(error.contains("'listen' is a table"), "{error}");
        let error = expand("node.toml", "config = \"other.toml\"\n", &[]).unwrap_err().to_string();
        assert!(error.contains("unknown key 'config'"), "{error}");
        let error = expand("node.json", "[1]", &[]).unwrap_err().to_string();
        assert!(error.contains("one JSON object"), "{error}");
        let error = expand("node.toml", "listen = ", &[]).unwrap_err().to_string();
        assert!(error.contains("not valid TOML"), "{error}");
    }

    #[test]
    fn the_command_line_follows_the_file() {
        let spliced = expand("node.toml", "shards = 2\n", &["--shards", "1"]).unwrap();
        assert_eq!(spliced, ["--shards=2"], "the file's flags come first; clap keeps the last value");
    }
}
