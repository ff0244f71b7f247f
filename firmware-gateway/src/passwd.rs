//! `tributary passwd USER`: reads a password from standard input and prints the
//! `[[auth.users]]` entry (salted SCRAM-SHA-256 and SCRAM-SHA-512 keys) to paste into
//! gateway.toml. The password itself is never stored.

use std::io::{BufRead, Write};

use anyhow::{bail, Context};
use tributary_broker::security::password::{PasswordHash, DEFAULT_ITERATIONS, ITERATIONS_MAX, ITERATIONS_MIN};

#[derive(Debug, clap::Args)]
pub struct PasswdArgs {
    /// The user name (MQTT username, Kafka SASL user).
    user: String,
    /// PBKDF2 iterations (each login costs one run; 4096 is Kafka's and RFC 7677's minimum).
    #[arg(long, default_value_t = DEFAULT_ITERATIONS)]
    iterations: u32,
}

/// The entry for `user` with `password`.
pub fn entry(user: &str, password: &str, iterations: u32) -> anyhow::Result<String> {
    if user.is_empty() || user.chars().any(char::is_control) {
        bail!("the user name must be non-empty, without control characters");
    }
    if !(ITERATIONS_MIN..=ITERATIONS_MAX).contains(&iterations) {
        bail!("--iterations must be between {ITERATIONS_MIN} and {ITERATIONS_MAX}");
    }
    let hash = PasswordHash::new(password.as_bytes(), iterations).map_err(anyhow::Error::msg)?;
    let name = toml::Value::String(user.to_string());
    Ok(format!(
        "[[auth.users]]\nname = {name}\npassword_hash = \"{}\"\n# mqtt.publish = [\"devices/%u/#\"]\n# mqtt.subscribe = [\"commands/%u/#\"]\n",
        hash.encode()
    ))
}

pub fn run(args: PasswdArgs) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    if std::io::IsTerminal::is_terminal(&stdin) {
        eprint!("password for {} (echoed; pipe it in to keep it off the screen): ", args.user);
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    stdin.lock().read_line(&mut line).context("read the password from standard input")?;
    let password = line.strip_suffix('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).unwrap_or(&line);
    if password.is_empty() {
        bail!("empty password");
    }
    print!("{}", entry(&args.user, password, args.iterations)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_broker::security::{Auth, AuthConfig};

    #[tokio::test]
    async fn the_printed_entry_logs_the_user_in() {
        let text = entry("meter \"7\"", "s3cret", 4096).expect("entry");
        #[derive(serde::Deserialize)]
        struct File {
            auth: AuthConfig,
        }
        let file: File = toml::from_str(&format!("[auth]\nenabled = true\n{text}")).expect("valid TOML");
        let auth = Auth::new(&file.auth, "auth").expect("valid entry");
        assert!(auth.check_password("meter \"7\"", b"s3cret").await.is_ok());
        assert!(auth.check_password("meter \"7\"", b"s3cret\n").await.is_err());
        assert!(entry("", "x", 4096).is_err());
        assert!(entry("u", "x", 1).is_err());
    }
}
