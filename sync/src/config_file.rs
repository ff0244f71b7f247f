//! Configuration files (TOML) of both binaries, `gateway.toml` and `cloud.toml`: parsing with
//! errors that name the dotted key (and its line) for every kind of mistake, and sizes and
//! durations written as a person writes them (`"8 GiB"`, `"7d"`), recognised by the unit that
//! ends the key's name. Lives here because `broker` knows nothing of files.
//!
//! The unit rule, applied to every key of every config without per-field annotations (names end
//! in their unit, optionally followed by `_max` or `_min`):
//! - `..._bytes`, `..._bytes_per_<x>` (e.g. `max_bytes`, `frame_bytes_max`,
//!   `bandwidth_bytes_per_s_max`): an integer, or a string `"<number> <unit>"` with B, KiB, MiB,
//!   GiB, TiB (powers of 1024) or kB, MB, GB, TB (powers of 1000);
//! - `..._ms` (e.g. `idle_timeout_ms`, `fetch_wait_max_ms`): an integer of milliseconds, or a
//!   string of numbers with units ms, s, m (or min), h, d: `"250ms"`, `"30s"`, `"12h"`, `"1h30m"`.
//!
//! Either form must come to a whole number of bytes or milliseconds.

use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};
use toml::Spanned;
use tributary_log::ConfigError;

const SIZE_FORMS: &str = "an integer number of bytes, or a number and a unit such as \"512 MiB\", \"8 GiB\" \
                          or \"64 KiB\" (units B, KiB, MiB, GiB, TiB in powers of 1024; kB, MB, GB, TB in \
                          powers of 1000)";
const DURATION_FORMS: &str = "an integer number of milliseconds, or numbers with units such as \"250ms\", \
                              \"30s\", \"5m\", \"12h\", \"7d\" or \"1h30m\" (units ms, s, m or min, h, d)";

/// What a key's value is measured in, by the last word of its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Bytes,
    Millis,
}

fn unit_of(key: &str) -> Option<Unit> {
    let base = key.strip_suffix("_max").or_else(|| key.strip_suffix("_min")).unwrap_or(key);
    let words: Vec<&str> = base.split('_').collect();
    if words.last() == Some(&"ms") {
        return Some(Unit::Millis);
    }
    let at = words.iter().rposition(|w| *w == "bytes")?;
    let rest = &words[at + 1..];
    (rest.is_empty() || (rest.len() == 2 && rest[0] == "per")).then_some(Unit::Bytes)
}

/// Splits `"12.5 MiB"` into its number (integer part, fraction digits) and the rest.
fn number(s: &str) -> Option<(u64, &str, &str)> {
    let end = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, rest) = s.split_at(end);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() || (num.contains('.') && frac.is_empty()) {
        return None;
    }
    Some((int.parse().ok()?, frac, rest))
}

/// `int.frac` times `mult`, if it is a whole number and fits.
fn scale(int: u64, frac: &str, mult: u64) -> Option<u64> {
    let whole = int.checked_mul(mult)?;
    if frac.is_empty() {
        return Some(whole);
    }
    let digits = u32::try_from(frac.len()).ok()?;
    let den = 10u128.checked_pow(digits)?;
    let part = u128::from(frac.parse::<u64>().ok()?) * u128::from(mult);
    if part % den != 0 {
        return None;
    }
    whole.checked_add(u64::try_from(part / den).ok()?)
}

/// `"8 GiB"`, `"512MiB"`, `"1.5 kB"`, `"1024"` in bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (int, frac, unit) = number(t)?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return None,
    };
    scale(int, frac, mult)
}

/// `"250ms"`, `"30s"`, `"7d"`, `"1h 30m"`, `"1.5s"`, `"250"` in milliseconds.
pub fn parse_duration(text: &str) -> Option<u64> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let (int, frac, after) = number(rest)?;
        let after = after.trim_start();
        let end = after.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(after.len());
        let (unit, tail) = after.split_at(end);
        let mult = match unit.to_ascii_lowercase().as_str() {
            // A bare number is milliseconds (the key's own unit), alone only.
            "" if total == 0 && tail.trim().is_empty() => 1,
            "ms" => 1,
            "s" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        total = total.checked_add(scale(int, frac, mult)?)?;
        rest = tail.trim_start();
    }
    Some(total)
}

fn line_of(text: &str, at: usize) -> usize {
    text.get(..at).map_or(1, |t| t.matches('\n').count() + 1)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Finds the human sizes and durations: the span of each and the integer to write there.
fn conversions(
    table: &DeTable<'_>,
    prefix: &str,
    text: &str,
    out: &mut Vec<(Range<usize>, String)>,
) -> Result<(), ConfigError> {
    for (key, value) in table.iter() {
        let path = join(prefix, key.get_ref());
        match value.get_ref() {
            DeValue::Table(t) => conversions(t, &path, text, out)?,
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let DeValue::Table(t) = item.get_ref() {
                        conversions(t, &format!("{path}[{i}]"), text, out)?;
                    }
                }
            }
            DeValue::String(s) => {
                let Some(unit) = unit_of(key.get_ref()) else { continue };
                let span = value.span();
                // A value over several lines is no size; refusing it keeps every line in place.
                let one_line = !text.get(span.clone()).unwrap_or_default().contains('\n');
                let parsed = one_line.then(|| match unit {
                    Unit::Bytes => {
                        parse_size(s.strip_suffix("/s").filter(|_| path.ends_with("_per_s_max")).unwrap_or(s))
                    }
                    Unit::Millis => parse_duration(s),
                });
                let Some(n) = parsed.flatten() else {
                    let (what, forms) = match unit {
                        Unit::Bytes => ("a size", SIZE_FORMS),
                        Unit::Millis => ("a duration", DURATION_FORMS),
                    };
                    return Err(ConfigError::new(
                        path,
                        format!("line {}: {s:?} is not {what}: write {forms}", line_of(text, span.start)),
                    ));
                };
                out.push((span, n.to_string()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The dotted key whose name or value covers `at` (array-of-tables entries as `name[i]`).
fn locate(table: &DeTable<'_>, at: usize, prefix: &str) -> Option<String> {
    let covers = |r: Range<usize>| r.start <= at && at < r.end.max(r.start + 1);
    for (key, value) in table.iter() {
        let path = join(prefix, key.get_ref());
        match value.get_ref() {
            DeValue::Table(t) => {
                if let Some(inner) = locate(t, at, &path) {
                    return Some(inner);
                }
            }
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let DeValue::Table(t) = item.get_ref() {
                        let entry = format!("{path}[{i}]");
                        if let Some(inner) = locate(t, at, &entry) {
                            return Some(inner);
                        }
                        if covers(item.span()) {
                            return Some(entry);
                        }
                    }
                }
            }
            _ => {}
        }
        let scalar = !matches!(value.get_ref(), DeValue::Table(_));
        if covers(key.span()) || (scalar && covers(value.span())) {
            return Some(path);
        }
    }
    None
}

/// For a syntax error: the key written on the error's line, under the section above it.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let mut section = String::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if i + 1 == line {
            let (key, _) = l.split_once('=')?;
            let key = key.trim().trim_matches('"');
            return (!key.is_empty() && !key.starts_with('#')).then(|| join(&section, key));
        }
        if let Some(h) = l.strip_prefix('[') {
            section = h.trim_start_matches('[').split(']').next().unwrap_or_default().trim().to_string();
        }
    }
    None
}

/// Parses a config file's text into `T`; every error names the dotted key it is about (and
/// the line), or the line alone when no key can be told (a syntax error between keys).
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let syntax = |text: &str, e: toml::de::Error| {
        let line = e.span().map_or(1, |s| line_of(text, s.start));
        let key = key_on_line(text, line).unwrap_or_else(|| format!("line {line}"));
        ConfigError::new(key, format!("line {line}: {}", e.message().trim()))
    };
    // Human sizes and durations become integers in the text (on their own lines, so line
    // numbers stay those of the file), which is then parsed for good.
    let mut found = Vec::new();
    conversions(DeTable::parse(text).map_err(|e| syntax(text, e))?.get_ref(), "", text, &mut found)?;
    found.sort_by_key(|(span, _)| std::cmp::Reverse(span.start));
    let mut plain = text.to_string();
    for (span, digits) in found {
        plain.replace_range(span, &digits);
    }
    let root: Spanned<DeTable<'_>> = DeTable::parse(&plain).map_err(|e| syntax(&plain, e))?;
    let tree = root.clone();
    T::deserialize(toml::de::Deserializer::from(root)).map_err(|e| {
        let message = e.message().trim().to_string();
        match e.span() {
            Some(span) => {
                let line = line_of(&plain, span.start);
                let key = locate(tree.get_ref(), span.start, "").unwrap_or_else(|| format!("line {line}"));
                ConfigError::new(key, format!("line {line}: {message}"))
            }
            None => ConfigError::new("config", message),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_is_the_last_word_of_the_key() {
        for key in ["max_bytes", "frame_bytes_max", "disk_free_bytes_min", "retention_bytes", "client_id_bytes_max"] {
            assert_eq!(unit_of(key), Some(Unit::Bytes), "{key}");
        }
        for key in ["bandwidth_bytes_per_s_max", "retention_delete_bytes_per_commit_max"] {
            assert_eq!(unit_of(key), Some(Unit::Bytes), "{key}");
        }
        for key in ["idle_timeout_ms", "fetch_wait_max_ms", "group_session_timeout_min_ms", "retention_ms"] {
            assert_eq!(unit_of(key), Some(Unit::Millis), "{key}");
        }
        for key in ["connections_max", "connections_per_ip_per_s_max", "bytes_seen_total", "partitions", "items"] {
            assert_eq!(unit_of(key), None, "{key}");
        }
    }

    #[test]
    fn sizes_as_a_person_writes_them() {
        for (text, bytes) in [
            ("8 GiB", 8 << 30),
            ("512 MiB", 512 << 20),
            ("512MiB", 512 << 20),
            ("64 kib", 64 << 10),
            ("1.5 KiB", 1536),
            ("2 TiB", 2 << 40),
            ("10 MB", 10_000_000),
            ("1 kB", 1000),
            ("100 B", 100),
            ("4096", 4096),
            (" 1 GB ", 1_000_000_000),
        ] {
            assert_eq!(parse_size(text), Some(bytes), "{text:?}");
        }
        for bad in ["lots", "", "GiB", "1.3 B", "0.1 KiB", "8 GiBs", "-1 MiB", "1e3", "20000000 TiB", "1. MiB"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn durations_as_a_person_writes_them() {
        for (text, ms) in [
            ("7d", 7 * 86_400_000),
            ("12h", 12 * 3_600_000),
            ("30s", 30_000),
            ("250ms", 250),
            ("5m", 300_000),
            ("5 min", 300_000),
            ("1h30m", 5_400_000),
            ("1h 30m", 5_400_000),
            ("1.5s", 1_500),
            ("250", 250),
        ] {
            assert_eq!(parse_duration(text), Some(ms), "{text:?}");
        }
        for bad in ["soon", "", "7 days", "1.5ms", "30 s s", "1h30", "-5s", "99999999999999999d"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Section {
        max_bytes: u64,
        idle_timeout_ms: u64,
        small_bytes_max: u32,
        listen: String,
        routes: Vec<Route>,
    }

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Route {
        filter: String,
        wait_ms: u64,
    }

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct File {
        storage: Section,
        top_bytes: u64,
    }

    fn err(text: &str) -> ConfigError {
        parse::<File>(text).expect_err(text)
    }

    #[test]
    fn human_forms_parse_into_integers() {
        let f: File = parse(
            "top_bytes = \"1 KiB\"\n[storage]\nmax_bytes = \"8 GiB\"\nidle_timeout_ms = \"7d\"\n\
             [[storage.routes]]\nfilter = \"a\"\nwait_ms = \"250ms\"\n",
        )
        .expect("parses");
        assert_eq!((f.top_bytes, f.storage.max_bytes, f.storage.idle_timeout_ms), (1024, 8 << 30, 604_800_000));
        assert_eq!(f.storage.routes, vec![Route { filter: "a".into(), wait_ms: 250 }]);
        // Plain integers are as before; strings of other keys are left alone.
        let f: File = parse("[storage]\nmax_bytes = 42\nlisten = \"8 GiB\"\n").expect("parses");
        assert_eq!((f.storage.max_bytes, f.storage.listen.as_str()), (42, "8 GiB"));
    }

    #[test]
    fn every_error_names_its_key_and_line() {
        let e = err("[storage]\nmax_bytes = \"lots\"\n");
        assert_eq!(e.key, "storage.max_bytes");
        assert!(e.reason.starts_with("line 2: ") && e.reason.contains("\"8 GiB\""), "{e}");
        let e = err("[storage]\nidle_timeout_ms = \"soon\"\n");
        assert_eq!(e.key, "storage.idle_timeout_ms");
        assert!(e.reason.contains("\"7d\""), "{e}");
        // Type errors, with and without a unit.
        let e = err("[storage]\n\nmax_bytes = true\n");
        assert_eq!((e.key.as_str(), e.reason.starts_with("line 3: ")), ("storage.max_bytes", true), "{e}");
        let e = err("[storage]\nlisten = 5\n");
        assert_eq!(e.key, "storage.listen", "{e}");
        let e = err("top_bytes = [1]\n");
        assert_eq!(e.key, "top_bytes", "{e}");
        // Out of the field's range after conversion.
        let e = err("[storage]\nsmall_bytes_max = \"8 GiB\"\n");
        assert_eq!(e.key, "storage.small_bytes_max", "{e}");
        // Unknown keys name themselves.
        let e = err("[storage]\nmax_bytse = 1\n");
        assert_eq!(e.key, "storage.max_bytse", "{e}");
        // Inside an array of tables.
        let e = err("[[storage.routes]]\nfilter = \"a\"\nwait_ms = \"x\"\n");
        assert_eq!(e.key, "storage.routes[0].wait_ms", "{e}");
        let e = err("[[storage.routes]]\nfilter = \"a\"\nwait_ms = 1\n[[storage.routes]]\nfilter = 1\nwait_ms = 1\n");
        assert_eq!(e.key, "storage.routes[1].filter", "{e}");
        let e = err("[[storage.routes]]\nfilter = \"a\"\nwait_ms = 1\n[[storage.routes]]\nfilter = \"b\"\n");
        assert!(e.key.starts_with("storage.routes") && e.reason.contains("wait_ms"), "{e}");
        // A syntax error on a key's line (an unquoted size).
        let e = err("[storage]\nmax_bytes = 8 GiB\n");
        assert_eq!(e.key, "storage.max_bytes", "{e}");
        assert!(e.reason.starts_with("line 2: "), "{e}");
    }
}
