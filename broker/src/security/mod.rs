//! Security of the listeners: the user database with salted password hashes and per-user ACLs
//! (`[auth]`), SASL mechanisms, TLS settings and per-address connection rate limits. Shared by
//! the MQTT and Kafka front ends, which ask [`Auth`] who a client is and what it may do.

pub mod acl;
pub mod password;
pub mod ratelimit;
pub mod sasl;
pub mod tls;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{check_range, ConfigError};
pub use acl::{KafkaAcl, MqttAcl};
pub use password::{Algorithm, PasswordHash, ScramKeys};
pub use sasl::Mechanism;

/// `[auth]`: whether clients must log in, and who may.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Require MQTT username/password (or a client certificate) and Kafka SASL on every
    /// listener, and check every operation against the user's rules (deny by default).
    pub enabled: bool,
    /// A failed login is answered this long after it started (that connection only), which
    /// makes guessing slow and hides whether the user exists.
    pub failure_delay_ms: u64,
    /// `[[auth.users]]`.
    pub users: Vec<UserConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { enabled: false, failure_delay_ms: 1000, users: Vec::new() }
    }
}

/// One `[[auth.users]]` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserConfig {
    /// MQTT username, Kafka SASL user name, or a client certificate's name.
    pub name: String,
    /// Salted keys printed by `tributary passwd NAME`; empty = no password login (client
    /// certificate only).
    pub password_hash: String,
    pub mqtt: MqttAcl,
    pub kafka: KafkaAcl,
}

/// Users at most in `[[auth.users]]` (names are looked up in a map; this bounds its memory).
const USERS_MAX: usize = 100_000;
/// `mqtt.client_ids` rules at most per user (bounds the start-up overlap check).
const CLIENT_ID_RULES_MAX: usize = 64;
const NAME_BYTES_MAX: usize = 256;

impl AuthConfig {
    /// Checks every value; errors name the key (`auth.users[2].password_hash`).
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        self.compile(prefix).map(|_| ())
    }

    fn compile(&self, prefix: &str) -> Result<HashMap<String, Arc<User>>, ConfigError> {
        check_range(&format!("{prefix}.failure_delay_ms"), self.failure_delay_ms, 0, 60_000)?;
        if self.users.len() > USERS_MAX {
            return Err(ConfigError::new(format!("{prefix}.users"), format!("at most {USERS_MAX} users")));
        }
        let mut users = HashMap::with_capacity(self.users.len());
        let mut client_ids = Vec::new();
        for (i, u) in self.users.iter().enumerate() {
            let key = |k: &str| format!("{prefix}.users[{i}].{k}");
            if u.name.is_empty() || u.name.len() > NAME_BYTES_MAX || u.name.chars().any(char::is_control) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("must be 1 to {NAME_BYTES_MAX} bytes without control characters"),
                ));
            }
            let hash = if u.password_hash.is_empty() {
                None
            } else {
                Some(PasswordHash::parse(&u.password_hash).map_err(|e| ConfigError::new(key("password_hash"), e))?)
            };
            if u.mqtt.client_ids.len() > CLIENT_ID_RULES_MAX {
                return Err(ConfigError::new(key("mqtt.client_ids"), format!("at most {CLIENT_ID_RULES_MAX} rules")));
            }
            let mut client_id_rules = Vec::with_capacity(u.mqtt.client_ids.len());
            for rule in &u.mqtt.client_ids {
                let compiled = acl::ClientIdRule::new(rule, &u.name).ok_or_else(|| {
                    ConfigError::new(
                        key("mqtt.client_ids"),
                        format!("{rule:?} is not a client id or a prefix ending in '*' (%u = the user name)"),
                    )
                })?;
                client_ids.push((compiled.clone(), i));
                client_id_rules.push(compiled);
            }
            for (k, rules) in [("mqtt.publish", &u.mqtt.publish), ("mqtt.subscribe", &u.mqtt.subscribe)] {
                if let Some(bad) = rules.iter().find(|r| !acl::valid_mqtt_rule(r)) {
                    return Err(ConfigError::new(key(k), format!("{bad:?} is not a valid MQTT topic filter")));
                }
            }
            let k = &u.kafka;
            for (name, patterns) in [
                ("kafka.read", &k.read),
                ("kafka.write", &k.write),
                ("kafka.create", &k.create),
                ("kafka.delete", &k.delete),
                ("kafka.groups", &k.groups),
            ] {
                if let Some(bad) = patterns.iter().find(|p| !acl::valid_pattern(p)) {
                    return Err(ConfigError::new(
                        key(name),
                        format!("{bad:?} is not a name, a prefix ending in '*', or '*'"),
                    ));
                }
            }
            let user =
                User { name: u.name.clone(), hash, mqtt: u.mqtt.clone(), kafka: u.kafka.clone(), client_id_rules };
            if users.insert(u.name.clone(), Arc::new(user)).is_some() {
                return Err(ConfigError::new(key("name"), format!("user {:?} is listed twice", u.name)));
            }
        }
        if let Some((a, b)) = acl::client_id_clash(&client_ids) {
            let ((ra, ua), (rb, ub)) = (&client_ids[a], &client_ids[b]);
            let (first, second) = if ua < ub { ((ra, *ua), (rb, *ub)) } else { ((rb, *ub), (ra, *ua)) };
            let show = |r: &acl::ClientIdRule| format!("{}{}", r.literal, if r.prefix { "*" } else { "" });
            return Err(ConfigError::new(
                format!("{prefix}.users[{}].mqtt.client_ids", second.1),
                format!(
                    "{:?} of user {:?} and {:?} of user {:?} can match the same client id: a client id must \
                     belong to one user (set mqtt.client_ids so that no two users' rules overlap)",
                    show(second.0),
                    self.users[second.1].name,
                    show(first.0),
                    self.users[first.1].name
                ),
            ));
        }
        Ok(users)
    }
}

/// An authenticated user and its rules.
#[derive(Debug)]
pub struct User {
    pub name: String,
    hash: Option<PasswordHash>,
    pub mqtt: MqttAcl,
    pub kafka: KafkaAcl,
    /// `mqtt.client_ids` with `%u` filled in.
    client_id_rules: Vec<acl::ClientIdRule>,
}

impl User {
    /// Whether the user may connect with this MQTT client id (its own, per `mqtt.client_ids`).
    pub fn may_use_client_id(&self, client_id: &str) -> bool {
        self.client_id_rules.iter().any(|r| r.matches(client_id))
    }

    pub fn may_publish(&self, client_id: &str, topic: &str) -> bool {
        acl::mqtt_allowed(&self.mqtt.publish, &self.name, client_id, topic)
    }

    pub fn may_subscribe(&self, client_id: &str, filter: &str) -> bool {
        acl::mqtt_allowed(&self.mqtt.subscribe, &self.name, client_id, filter)
    }
}

/// A Kafka operation on a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicOp {
    Read,
    Write,
    Create,
    Delete,
    /// Seeing that the topic exists (metadata, configs): any of the others implies it.
    Describe,
}

/// What a connection may do: everything (authentication off), what its user may, or nothing
/// (not authenticated yet).
#[derive(Debug, Clone)]
pub enum Access {
    All,
    User(Arc<User>),
    Denied,
}

impl Access {
    pub fn topic(&self, op: TopicOp, topic: &str) -> bool {
        let u = match self {
            Access::All => return true,
            Access::Denied => return false,
            Access::User(u) => u,
        };
        let k = &u.kafka;
        let m = |p: &[String]| acl::pattern_matches(p, topic);
        match op {
            TopicOp::Read => m(&k.read),
            TopicOp::Write => m(&k.write),
            TopicOp::Create => m(&k.create),
            TopicOp::Delete => m(&k.delete),
            TopicOp::Describe => m(&k.read) || m(&k.write) || m(&k.create) || m(&k.delete),
        }
    }

    pub fn group(&self, group: &str) -> bool {
        match self {
            Access::All => true,
            Access::User(u) => acl::pattern_matches(&u.kafka.groups, group),
            Access::Denied => false,
        }
    }

    pub fn admin(&self) -> bool {
        match self {
            Access::All => true,
            Access::User(u) => u.kafka.admin,
            Access::Denied => false,
        }
    }

    /// Idempotent producers need an id: anyone who may write somewhere (Kafka's rule since 2.8).
    pub fn any_write(&self) -> bool {
        match self {
            Access::All => true,
            Access::User(u) => u.kafka.admin || !u.kafka.write.is_empty(),
            Access::Denied => false,
        }
    }

    pub fn user(&self) -> Option<&str> {
        match self {
            Access::All | Access::Denied => None,
            Access::User(u) => Some(&u.name),
        }
    }
}

/// The compiled user database, shared by the listeners.
#[derive(Debug)]
pub struct Auth {
    enabled: bool,
    failure_delay: Duration,
    users: HashMap<String, Arc<User>>,
    /// Key of the salts made up for unknown SCRAM users (random per process).
    fake_salt_key: ring::hmac::Key,
}

impl Auth {
    /// Validates and compiles `[auth]`.
    pub fn new(cfg: &AuthConfig, prefix: &str) -> Result<Arc<Self>, ConfigError> {
        let users = cfg.compile(prefix)?;
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| ConfigError::new(prefix, "the system random number generator failed"))?;
        Ok(Arc::new(Self {
            enabled: cfg.enabled,
            failure_delay: Duration::from_millis(cfg.failure_delay_ms),
            users,
            fake_salt_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
        }))
    }

    /// Authentication off: every client may do everything.
    pub fn disabled() -> Arc<Self> {
        Self::new(&AuthConfig::default(), "auth").unwrap_or_else(|_| {
            Arc::new(Self {
                enabled: false,
                failure_delay: Duration::ZERO,
                users: HashMap::new(),
                fake_salt_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"unused"),
            })
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// The user a verified client certificate names.
    pub fn user(&self, name: &str) -> Option<Arc<User>> {
        self.users.get(name).cloned()
    }

    /// Checks a user name and clear-text password (MQTT CONNECT, SASL PLAIN). The PBKDF2 run
    /// happens on the blocking pool, not on an async worker.
    pub async fn check_password(&self, name: &str, password: &[u8]) -> Result<Arc<User>, LoginError> {
        let user = self.users.get(name).cloned().ok_or(LoginError::UnknownUser)?;
        let Some(hash) = user.hash.clone() else { return Err(LoginError::NoPassword) };
        let password = password.to_vec();
        let ok = tokio::task::spawn_blocking(move || hash.verify(&password)).await.unwrap_or(false);
        if ok {
            Ok(user)
        } else {
            Err(LoginError::WrongPassword)
        }
    }

    /// SCRAM keys of a user for `alg`.
    pub fn scram_keys(&self, name: &str, alg: Algorithm) -> Option<ScramKeys> {
        self.users.get(name).and_then(|u| u.hash.as_ref()).and_then(|h| h.keys(alg)).cloned()
    }

    /// A stable salt for a user name without SCRAM keys, so the exchange looks the same.
    pub fn fake_salt(&self, name: &str) -> Vec<u8> {
        ring::hmac::sign(&self.fake_salt_key, name.as_bytes()).as_ref()[..16].to_vec()
    }

    /// Waits until `failure_delay` after `started`: failed logins are answered late.
    pub async fn delay_failure(&self, started: Instant) {
        tokio::time::sleep_until((started + self.failure_delay).into()).await;
    }
}

/// Why a login failed (for the log; clients get one answer for all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("unknown user")]
    UnknownUser,
    #[error("wrong password")]
    WrongPassword,
    #[error("the user has no password (client certificate only)")]
    NoPassword,
    #[error("no credentials")]
    NoCredentials,
    #[error("{0}")]
    Protocol(String),
}

/// A fresh printable nonce for SCRAM (24 random bytes, base64).
pub fn nonce() -> String {
    use base64::Engine as _;
    let mut b = [0u8; 24];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserConfig {
        UserConfig {
            name: name.into(),
            password_hash: PasswordHash::new(b"pw", 4096).expect("hash").encode(),
            ..Default::default()
        }
    }

    #[test]
    fn errors_name_the_key() {
        AuthConfig::default().validate("auth").expect("defaults");
        let mut c = AuthConfig { users: vec![user("a"), user("a")], ..Default::default() };
        assert_eq!(c.validate("auth").expect_err("twice").key, "auth.users[1].name");
        c.users[1] = UserConfig { name: "b".into(), password_hash: "nonsense".into(), ..Default::default() };
        assert_eq!(c.validate("auth").expect_err("hash").key, "auth.users[1].password_hash");
        c.users[1] = UserConfig { name: "b".into(), ..Default::default() };
        c.users[1].mqtt.publish = vec!["a/#/b".into()];
        assert_eq!(c.validate("auth").expect_err("filter").key, "auth.users[1].mqtt.publish");
        c.users[1].mqtt.publish.clear();
        c.users[1].kafka.groups = vec!["a*b".into()];
        assert_eq!(c.validate("auth").expect_err("pattern").key, "auth.users[1].kafka.groups");
        c.users[1].kafka.groups.clear();
        c.users[1].mqtt.client_ids = vec!["a*b".into()];
        assert_eq!(c.validate("auth").expect_err("client id rule").key, "auth.users[1].mqtt.client_ids");
        // Default rules of "a" ("a", "a-*") and "a-1" ("a-1", "a-1-*") overlap.
        c.users[1] = user("a-1");
        let e = c.validate("auth").expect_err("overlap");
        assert_eq!(e.key, "auth.users[1].mqtt.client_ids");
        assert!(e.reason.contains("\"a-1\"") && e.reason.contains("\"a\""), "{}", e.reason);
        c.users[1].mqtt.client_ids = vec!["meter-1".into()];
        c.users[0].mqtt.client_ids = vec!["a".into()];
        c.validate("auth").expect("disjoint rules");
        let c = AuthConfig { failure_delay_ms: 100_000, ..Default::default() };
        assert_eq!(c.validate("auth").expect_err("delay").key, "auth.failure_delay_ms");
    }

    #[tokio::test]
    async fn passwords_and_access() {
        let mut u = user("alice");
        u.kafka.read = vec!["meters*".into()];
        let auth =
            Auth::new(&AuthConfig { enabled: true, users: vec![u], ..Default::default() }, "auth").expect("auth");
        let alice = auth.check_password("alice", b"pw").await.expect("right password");
        assert_eq!(auth.check_password("alice", b"px").await.expect_err("wrong"), LoginError::WrongPassword);
        assert_eq!(auth.check_password("bob", b"pw").await.expect_err("unknown"), LoginError::UnknownUser);
        assert!(alice.may_use_client_id("alice") && alice.may_use_client_id("alice-7"));
        assert!(!alice.may_use_client_id("alicex") && !alice.may_use_client_id("bob"));
        let a = Access::User(alice);
        assert!(a.topic(TopicOp::Read, "meters-1") && a.topic(TopicOp::Describe, "meters-1"));
        assert!(!a.topic(TopicOp::Write, "meters-1") && !a.topic(TopicOp::Read, "other"));
        assert!(!a.group("g") && !a.admin() && !a.any_write());
        assert!(Access::All.topic(TopicOp::Delete, "x") && Access::All.admin());
        assert_eq!(auth.fake_salt("x"), auth.fake_salt("x"));
        assert_ne!(auth.fake_salt("x"), auth.fake_salt("y"));
    }
}
