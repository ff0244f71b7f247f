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
    /// `[auth.anonymous]`: rules for MQTT clients that connect without credentials. Unset: with
    /// `enabled` such a CONNECT is refused, without it every client may do everything. Set: with
    /// `enabled` a CONNECT without username and password (nor certificate) is accepted under
    /// these rules; without it every MQTT client is under them (credentials are not checked).
    /// Kafka is not affected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymous: Option<AnonymousConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { enabled: false, failure_delay_ms: 1000, users: Vec::new(), anonymous: None }
    }
}

/// `[auth.anonymous]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnonymousConfig {
    /// The same MQTT rules as a user's; `%u` (no user name) matches nothing in allow rules and
    /// any level in deny rules.
    pub mqtt: MqttAcl,
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
    /// May log in to the gateway's status page (HTTP Basic with this name and password) while
    /// `[auth]` is enabled; read-only, it shows topics, clients, groups, the mirror and refusals.
    pub status: bool,
}

/// Users at most in `[[auth.users]]` (names are looked up in a map; this bounds its memory).
const USERS_MAX: usize = 100_000;
/// `mqtt.client_ids` rules at most per user (bounds the start-up overlap check).
const CLIENT_ID_RULES_MAX: usize = 64;
const NAME_BYTES_MAX: usize = 256;
/// Topic filters at most in each of `mqtt.publish`, `mqtt.subscribe`, `mqtt.publish_deny` and
/// `mqtt.subscribe_deny` (each publish, subscription and delivery is checked against them).
const MQTT_RULES_MAX: usize = 1024;

impl AuthConfig {
    /// Checks every value; errors name the key (`auth.users[2].password_hash`).
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        self.compile(prefix).map(|_| ())
    }

    fn compile(&self, prefix: &str) -> Result<Compiled, ConfigError> {
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
            let client_id_rules = compile_mqtt(&u.mqtt, &u.name, acl::default_client_ids, &key)?;
            client_ids.extend(client_id_rules.iter().map(|r| (r.clone(), i)));
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
            let user = User {
                name: u.name.clone(),
                hash,
                mqtt: u.mqtt.clone(),
                kafka: u.kafka.clone(),
                status: u.status,
                client_id_rules,
                users_ids: None,
            };
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
        let anonymous = match &self.anonymous {
            None => None,
            Some(a) => {
                let key = |k: &str| format!("{prefix}.anonymous.{k}");
                if let Some(bad) = a.mqtt.client_ids.iter().flatten().find(|r| r.contains("%u")) {
                    return Err(ConfigError::new(
                        key("mqtt.client_ids"),
                        format!("{bad:?}: anonymous clients have no user name for %u"),
                    ));
                }
                let client_id_rules = compile_mqtt(&a.mqtt, "", acl::default_anonymous_client_ids, &key)?;
                // With logins on, an id a user owns is never an anonymous client's (nor its
                // session); with them off there are no users to own one.
                let mut index = acl::ClientIdIndex::default();
                if self.enabled {
                    for (rule, _) in &client_ids {
                        index.insert(rule);
                    }
                }
                Some(Arc::new(User {
                    name: String::new(),
                    hash: None,
                    mqtt: a.mqtt.clone(),
                    kafka: KafkaAcl::default(),
                    status: false,
                    client_id_rules,
                    users_ids: Some(index),
                }))
            }
        };
        Ok(Compiled { users, anonymous })
    }
}

/// `[auth]` after validation.
struct Compiled {
    users: HashMap<String, Arc<User>>,
    anonymous: Option<Arc<User>>,
}

/// Checks the `mqtt` rules of a user (or of anonymous clients, `user` empty) and compiles its
/// client-id rules (`default_ids` when unset); `key` names a key of its entry.
fn compile_mqtt(
    m: &MqttAcl,
    user: &str,
    default_ids: fn() -> Vec<String>,
    key: &dyn Fn(&str) -> String,
) -> Result<Vec<acl::ClientIdRule>, ConfigError> {
    let ids = m.client_ids.clone().unwrap_or_else(default_ids);
    if ids.len() > CLIENT_ID_RULES_MAX {
        return Err(ConfigError::new(key("mqtt.client_ids"), format!("at most {CLIENT_ID_RULES_MAX} rules")));
    }
    let mut rules = Vec::with_capacity(ids.len());
    for rule in &ids {
        rules.push(acl::ClientIdRule::new(rule, user).ok_or_else(|| {
            ConfigError::new(
                key("mqtt.client_ids"),
                format!("{rule:?} is not a client id or a prefix ending in '*' (%u = the user name)"),
            )
        })?);
    }
    for (k, filters) in [
        ("mqtt.publish", &m.publish),
        ("mqtt.subscribe", &m.subscribe),
        ("mqtt.publish_deny", &m.publish_deny),
        ("mqtt.subscribe_deny", &m.subscribe_deny),
    ] {
        if filters.len() > MQTT_RULES_MAX {
            return Err(ConfigError::new(key(k), format!("at most {MQTT_RULES_MAX} rules")));
        }
        if let Some(bad) = filters.iter().find(|r| !acl::valid_mqtt_rule(r)) {
            return Err(ConfigError::new(key(k), format!("{bad:?} is not a valid MQTT topic filter")));
        }
    }
    Ok(rules)
}

/// An authenticated user and its rules, or the rules of anonymous MQTT clients (empty name).
#[derive(Debug)]
pub struct User {
    pub name: String,
    hash: Option<PasswordHash>,
    pub mqtt: MqttAcl,
    pub kafka: KafkaAcl,
    /// May view the status page (`[[auth.users]] status`).
    pub status: bool,
    /// `mqtt.client_ids` with `%u` filled in.
    client_id_rules: Vec<acl::ClientIdRule>,
    /// Anonymous clients only: the client ids users own, which they may not use.
    users_ids: Option<acl::ClientIdIndex>,
}

impl User {
    /// The rules of `[auth.anonymous]`, not a user who logged in.
    pub fn is_anonymous(&self) -> bool {
        self.users_ids.is_some()
    }

    /// Whether the user may connect with this MQTT client id (its own, per `mqtt.client_ids`;
    /// for anonymous clients also one no user owns).
    pub fn may_use_client_id(&self, client_id: &str) -> bool {
        self.client_id_rules.iter().any(|r| r.matches(client_id))
            && !self.users_ids.as_ref().is_some_and(|ix| ix.claims(client_id))
    }

    /// Whether `topic` is within `mqtt.publish` and not within `mqtt.publish_deny`.
    pub fn may_publish(&self, client_id: &str, topic: &str) -> bool {
        acl::mqtt_allowed(&self.mqtt.publish, &self.name, client_id, topic)
            && !acl::mqtt_denied(&self.mqtt.publish_deny, &self.name, client_id, topic)
    }

    /// Whether a subscription to `filter` (or the delivery of a message on a topic) is within
    /// `mqtt.subscribe` and not within `mqtt.subscribe_deny`.
    pub fn may_subscribe(&self, client_id: &str, filter: &str) -> bool {
        acl::mqtt_allowed(&self.mqtt.subscribe, &self.name, client_id, filter)
            && !acl::mqtt_denied(&self.mqtt.subscribe_deny, &self.name, client_id, filter)
    }

    /// Whether a message on `topic` that one of the client's (granted) subscriptions matches
    /// must not be delivered: `mqtt.subscribe_deny` covers it. Free without deny rules.
    pub fn delivery_denied(&self, client_id: &str, topic: &str) -> bool {
        !self.mqtt.subscribe_deny.is_empty()
            && acl::mqtt_denied(&self.mqtt.subscribe_deny, &self.name, client_id, topic)
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
    /// `[auth.anonymous]`, compiled.
    anonymous: Option<Arc<User>>,
    /// Key of the salts made up for unknown SCRAM users (random per process).
    fake_salt_key: ring::hmac::Key,
}

impl Auth {
    /// Validates and compiles `[auth]`.
    pub fn new(cfg: &AuthConfig, prefix: &str) -> Result<Arc<Self>, ConfigError> {
        let Compiled { users, anonymous } = cfg.compile(prefix)?;
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| ConfigError::new(prefix, "the system random number generator failed"))?;
        Ok(Arc::new(Self {
            enabled: cfg.enabled,
            failure_delay: Duration::from_millis(cfg.failure_delay_ms),
            users,
            anonymous,
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
                anonymous: None,
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

    /// The rules of MQTT clients without credentials (`[auth.anonymous]`), if any.
    pub fn anonymous(&self) -> Option<Arc<User>> {
        self.anonymous.clone()
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
        c.users[1].mqtt.client_ids = Some(vec!["a*b".into()]);
        assert_eq!(c.validate("auth").expect_err("client id rule").key, "auth.users[1].mqtt.client_ids");
        // Default rules of "a" ("a", "a-*") and "a-1" ("a-1", "a-1-*") overlap.
        c.users[1] = user("a-1");
        let e = c.validate("auth").expect_err("overlap");
        assert_eq!(e.key, "auth.users[1].mqtt.client_ids");
        assert!(e.reason.contains("\"a-1\"") && e.reason.contains("\"a\""), "{}", e.reason);
        c.users[1].mqtt.client_ids = Some(vec!["meter-1".into()]);
        c.users[0].mqtt.client_ids = Some(vec!["a".into()]);
        c.validate("auth").expect("disjoint rules");
        let c = AuthConfig { failure_delay_ms: 100_000, ..Default::default() };
        assert_eq!(c.validate("auth").expect_err("delay").key, "auth.failure_delay_ms");
    }

    fn anonymous(publish: &[&str], subscribe: &[&str], subscribe_deny: &[&str]) -> AnonymousConfig {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        AnonymousConfig {
            mqtt: MqttAcl {
                publish: v(publish),
                subscribe: v(subscribe),
                subscribe_deny: v(subscribe_deny),
                ..Default::default()
            },
        }
    }

    #[test]
    fn anonymous_rules_are_checked_at_start_up() {
        let mut c = AuthConfig { anonymous: Some(anonymous(&["a/#/b"], &[], &[])), ..Default::default() };
        assert_eq!(c.validate("auth").expect_err("filter").key, "auth.anonymous.mqtt.publish");
        c.anonymous = Some(anonymous(&[], &[], &["+/+#"]));
        assert_eq!(c.validate("auth").expect_err("deny filter").key, "auth.anonymous.mqtt.subscribe_deny");
        let mut a = anonymous(&[], &[], &[]);
        a.mqtt.client_ids = Some(vec!["%u-*".into()]);
        c.anonymous = Some(a);
        let e = c.validate("auth").expect_err("%u");
        assert_eq!(e.key, "auth.anonymous.mqtt.client_ids");
        assert!(e.reason.contains("user name"), "{}", e.reason);
        c.anonymous = Some(anonymous(&[], &[], &[]));
        c.users = vec![user("a")];
        c.users[0].mqtt.subscribe_deny = vec!["#/x".into()];
        assert_eq!(c.validate("auth").expect_err("user deny").key, "auth.users[0].mqtt.subscribe_deny");
        c.users[0].mqtt.subscribe_deny = vec!["x".into(); MQTT_RULES_MAX + 1];
        assert_eq!(c.validate("auth").expect_err("too many").key, "auth.users[0].mqtt.subscribe_deny");
        c.users[0].mqtt.subscribe_deny.clear();
        c.validate("auth").expect("anonymous ['*'] beside users is fine: user ids are excluded at connect");
    }

    #[test]
    fn anonymous_clients_get_their_rules_and_no_users_id() {
        let a = anonymous(&["public/#", "devices/%c/#", "users/%u/#"], &["#"], &["test/nosubscribe"]);
        let mut alice = user("alice");
        alice.mqtt.client_ids = Some(vec!["alice".into(), "meter-*".into()]);
        let on = AuthConfig { enabled: true, users: vec![alice], anonymous: Some(a.clone()), ..Default::default() };
        let auth = Auth::new(&on, "auth").expect("auth");
        let anon = auth.anonymous().expect("anonymous rules");
        assert!(anon.is_anonymous() && !auth.user("alice").expect("alice").is_anonymous());
        assert!(anon.may_use_client_id("sensor-1") && anon.may_use_client_id("alice2"));
        assert!(!anon.may_use_client_id("alice") && !anon.may_use_client_id("meter-9"), "users' ids");
        assert!(anon.may_publish("d1", "public/x") && anon.may_publish("d1", "devices/d1/t"));
        assert!(!anon.may_publish("d1", "devices/d2/t") && !anon.may_publish("d1", "private/x"));
        assert!(!anon.may_publish("d1", "users//x") && !anon.may_publish("d1", "users/alice/x"), "%u matches nothing");
        assert!(anon.may_subscribe("d1", "#") && anon.may_subscribe("d1", "test/+"));
        assert!(!anon.may_subscribe("d1", "test/nosubscribe"), "deny wins over '#'");
        assert!(anon.delivery_denied("d1", "test/nosubscribe") && !anon.delivery_denied("d1", "test/other"));
        // Logins off: every client is anonymous, and no user owns an id.
        let off = AuthConfig { enabled: false, ..on };
        let anon = Auth::new(&off, "auth").expect("auth").anonymous().expect("anonymous rules");
        assert!(anon.may_use_client_id("alice"));
        let mut only = a;
        only.mqtt.client_ids = Some(vec!["anon-*".into()]);
        let cfg = AuthConfig { anonymous: Some(only), ..Default::default() };
        let anon = Auth::new(&cfg, "auth").expect("auth").anonymous().expect("anonymous rules");
        assert!(anon.may_use_client_id("anon-1") && !anon.may_use_client_id("sensor-1"));
        assert!(Auth::disabled().anonymous().is_none());
    }

    #[test]
    fn a_users_deny_rule_wins_over_its_allow_rules() {
        let mut u = user("bob");
        u.mqtt.publish = vec!["#".into()];
        u.mqtt.publish_deny = vec!["commands/#".into(), "devices/%c/config".into()];
        u.mqtt.subscribe = vec!["#".into()];
        u.mqtt.subscribe_deny = vec!["users/+/private".into(), "users/%u/secret".into()];
        let auth = Auth::new(&AuthConfig { users: vec![u], ..Default::default() }, "auth").expect("auth");
        let bob = auth.user("bob").expect("bob");
        assert!(bob.may_publish("bob-1", "meters/1") && bob.may_publish("bob-1", "devices/bob-2/config"));
        assert!(!bob.may_publish("bob-1", "commands/valve") && !bob.may_publish("bob-1", "devices/bob-1/config"));
        assert!(!bob.may_subscribe("bob-1", "users/alice/private") && !bob.may_subscribe("bob-1", "users/bob/secret"));
        assert!(bob.may_subscribe("bob-1", "users/alice/secret") && bob.may_subscribe("bob-1", "users/#"));
        assert!(bob.delivery_denied("bob-1", "users/bob/secret") && !bob.delivery_denied("bob-1", "users/bob/x"));
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
