//! Parser for option strings such as `boot=2,template=pvm,mask=[avx,bmi2]`.
//!
//! Values may be bracketed lists (`[a,b]`) or double-quoted strings, so commas inside them do
//! not split options. A bare word without `=` is allowed only where the caller declares a
//! "positional" key (as in `--serial tty`). Unknown keys, repeated keys and malformed input are
//! errors: an operator who mistypes `sise=1G` must hear about it, not get a default.

use std::collections::BTreeMap;

/// Errors from parsing an option string.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    /// A key that this option does not know.
    #[error("Unknown option '{key}' (valid options: {valid})")]
    UnknownKey {
        /// The key as written.
        key: String,
        /// The keys the option accepts, comma-separated.
        valid: String,
    },
    /// The same key given twice.
    #[error("Option '{0}' given more than once")]
    DuplicateKey(String),
    /// A bare word where `key=value` was expected.
    #[error("Expected key=value, found '{0}'")]
    MissingValue(String),
    /// An opening bracket or quote without its closing partner.
    #[error("Unterminated {0} in option string")]
    Unterminated(&'static str),
    /// An empty key (`=value`) or an empty option string.
    #[error("Empty option in '{0}'")]
    Empty(String),
    /// A key that must be given is not.
    #[error("Option '{0}' is required")]
    Required(&'static str),
    /// A value that does not parse as what the key expects.
    #[error("Invalid value '{value}' for option '{key}': {reason}")]
    InvalidValue {
        /// The key whose value was rejected.
        key: String,
        /// The value as written.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
}

/// The parsed `key=value` pairs of one option string.
#[derive(Debug, Default)]
pub struct OptionParser {
    values: BTreeMap<String, String>,
}

/// Splits `s` at top-level commas, keeping brackets and quotes intact.
fn split_top_level(s: &str) -> Result<Vec<&str>, OptionError> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut in_quotes = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            '[' if !in_quotes => depth += 1,
            ']' if !in_quotes => {
                depth = depth
                    .checked_sub(1)
                    .ok_or(OptionError::Unterminated("']'"))?
            }
            ',' if !in_quotes && depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if in_quotes {
        return Err(OptionError::Unterminated("quote"));
    }
    if depth != 0 {
        return Err(OptionError::Unterminated("bracket"));
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

impl OptionParser {
    /// Parses `input`, accepting only `valid` keys. A bare word (no `=`) is stored under
    /// `positional` when given, and is an error otherwise.
    pub fn parse(
        input: &str,
        valid: &[&str],
        positional: Option<&str>,
    ) -> Result<Self, OptionError> {
        let mut values = BTreeMap::new();
        if input.trim().is_empty() {
            return Err(OptionError::Empty(input.to_string()));
        }
        for part in split_top_level(input)? {
            let part = part.trim();
            if part.is_empty() {
                return Err(OptionError::Empty(input.to_string()));
            }
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k.trim(), unquote(v.trim())),
                None => match positional {
                    Some(p) => (p, part),
                    None => return Err(OptionError::MissingValue(part.to_string())),
                },
            };
            if key.is_empty() {
                return Err(OptionError::Empty(input.to_string()));
            }
            if !valid.contains(&key) {
                return Err(OptionError::UnknownKey {
                    key: key.to_string(),
                    valid: valid.join(", "),
                });
            }
            if values.insert(key.to_string(), value.to_string()).is_some() {
                return Err(OptionError::DuplicateKey(key.to_string()));
            }
        }
        Ok(OptionParser { values })
    }

    /// The raw value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The raw value of `key`, which must be given.
    pub fn required(&self, key: &'static str) -> Result<&str, OptionError> {
        self.get(key).ok_or(OptionError::Required(key))
    }

    /// The value of `key` converted with `convert`, which explains a rejection in its error.
    pub fn convert<T>(
        &self,
        key: &str,
        convert: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, OptionError> {
        self.get(key)
            .map(|value| {
                convert(value).map_err(|reason| OptionError::InvalidValue {
                    key: key.to_string(),
                    value: value.to_string(),
                    reason,
                })
            })
            .transpose()
    }
}

/// Parses `on`/`off` (and `true`/`false`).
pub fn parse_toggle(value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err("expected on or off".to_string()),
    }
}

/// Parses an integer in decimal or `0x` hexadecimal.
pub fn parse_int<T: TryFrom<u64>>(value: &str) -> Result<T, String> {
    let n = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse::<u64>(),
    }
    .map_err(|e| format!("not a number ({e})"))?;
    T::try_from(n).map_err(|_| format!("{n} is out of range"))
}

/// Parses a byte size with an optional binary suffix: `512M`, `5G`, `4096`, `1T`.
pub fn parse_size(value: &str) -> Result<u64, String> {
    let (digits, shift) = match value.char_indices().last() {
        Some((i, 'K' | 'k')) => (&value[..i], 10),
        Some((i, 'M' | 'm')) => (&value[..i], 20),
        Some((i, 'G' | 'g')) => (&value[..i], 30),
        Some((i, 'T' | 't')) => (&value[..i], 40),
        _ => (value, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|e| format!("expected a size such as 512M, 4G or a number of bytes ({e})"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| "size too large".to_string())
}

/// Parses a bracketed list `[a,b,c]` (or a single bare item) into its items.
pub fn parse_list(value: &str) -> Result<Vec<String>, String> {
    let inner = match value.strip_prefix('[') {
        Some(rest) => rest
            .strip_suffix(']')
            .ok_or_else(|| "unterminated list".to_string())?,
        None => value,
    };
    Ok(inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect())
}

/// Parses a list of descriptor numbers, `[3,4]` or `3`.
pub fn parse_fds(value: &str) -> Result<Vec<i32>, String> {
    let items = parse_list(value)?;
    if items.is_empty() {
        return Err("expected descriptor numbers such as [3,4]".to_string());
    }
    items
        .iter()
        .map(|i| {
            i.parse::<i32>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| format!("'{i}' is not a descriptor number"))
        })
        .collect()
}

/// Parses `[id@[3,4],id2@[5]]`: descriptors per device id, in order (Cloud Hypervisor's
/// `net_fds` syntax).
pub fn parse_fds_by_id(value: &str) -> Result<Vec<(String, Vec<i32>)>, String> {
    let inner = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .ok_or_else(|| "expected [id@[fd,...],...]".to_string())?;
    split_top_level(inner)
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let (id, fds) = item
                .split_once('@')
                .ok_or_else(|| format!("'{item}' is not id@[fd,...]"))?;
            if id.is_empty() {
                return Err(format!("'{item}' names no device"));
            }
            Ok((id.to_string(), parse_fds(fds)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_lists_and_quotes() {
        let p = OptionParser::parse(
            "boot=4,mask=[avx,bmi2],cmd=\"a,b=c\"",
            &["boot", "mask", "cmd"],
            None,
        )
        .unwrap();
        assert_eq!(p.get("boot"), Some("4"));
        assert_eq!(p.get("mask"), Some("[avx,bmi2]"));
        assert_eq!(p.get("cmd"), Some("a,b=c"));
        assert_eq!(
            parse_list(p.get("mask").unwrap()).unwrap(),
            vec!["avx", "bmi2"]
        );
    }

    #[test]
    fn positional_word() {
        let p = OptionParser::parse("tty", &["mode", "file"], Some("mode")).unwrap();
        assert_eq!(p.get("mode"), Some("tty"));
        assert_eq!(
            OptionParser::parse("tty", &["mode"], None).unwrap_err(),
            OptionError::MissingValue("tty".into())
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            OptionParser::parse("sise=1G", &["size"], None),
            Err(OptionError::UnknownKey { .. })
        ));
        assert_eq!(
            OptionParser::parse("size=1G,size=2G", &["size"], None).unwrap_err(),
            OptionError::DuplicateKey("size".into())
        );
        assert!(OptionParser::parse("", &["size"], None).is_err());
        assert!(OptionParser::parse("size=1G,", &["size"], None).is_err());
        assert!(OptionParser::parse("=1", &["size"], None).is_err());
        assert!(OptionParser::parse("mask=[a,b", &["mask"], None).is_err());
        assert!(OptionParser::parse("mask=a]", &["mask"], None).is_err());
        assert!(OptionParser::parse("c=\"abc", &["c"], None).is_err());
    }

    #[test]
    fn descriptor_lists() {
        assert_eq!(parse_fds("[3,4]"), Ok(vec![3, 4]));
        assert_eq!(parse_fds("7"), Ok(vec![7]));
        assert!(parse_fds("[]").is_err());
        assert!(parse_fds("[-1]").is_err());
        assert!(parse_fds("[x]").is_err());
        assert_eq!(
            parse_fds_by_id("[net0@[3,4],net1@[5]]"),
            Ok(vec![("net0".into(), vec![3, 4]), ("net1".into(), vec![5])])
        );
        assert!(parse_fds_by_id("net0@[3]").is_err());
        assert!(parse_fds_by_id("[net0]").is_err());
        assert!(parse_fds_by_id("[@[3]]").is_err());
        assert!(parse_fds_by_id("[net0@[3]").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("5G"), Ok(5 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert!(parse_size("G").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
        assert!(parse_size("18446744073709551615K").is_err());
    }

    #[test]
    fn ints_and_toggles() {
        assert_eq!(parse_int::<u8>("0x10"), Ok(16));
        assert!(parse_int::<u8>("256").is_err());
        assert!(parse_int::<u8>("-1").is_err());
        assert_eq!(parse_toggle("on"), Ok(true));
        assert_eq!(parse_toggle("off"), Ok(false));
        assert!(parse_toggle("yes").is_err());
    }

    #[test]
    fn convert_reports_key_and_value() {
        let p = OptionParser::parse("boot=x", &["boot"], None).unwrap();
        let err = p.convert("boot", parse_int::<u8>).unwrap_err();
        assert!(err.to_string().contains("'x'"), "{err}");
        assert!(err.to_string().contains("'boot'"), "{err}");
    }
}
