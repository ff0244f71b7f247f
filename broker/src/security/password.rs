//! Stored passwords: the `password_hash` format of `[[auth.users]]` (salted SCRAM keys for
//! SHA-256 and SHA-512, so one entry serves PLAIN and both SCRAM mechanisms without the server
//! ever holding a password), creating an entry (`tributary passwd`) and checking a password.
//!
//! Format: one or two space-separated parts `scram-sha-256:<iterations>:<salt>:<StoredKey>:<ServerKey>`
//! and `scram-sha-512:...`, salt and keys in standard base64, keys as in RFC 5802:
//! `SaltedPassword = PBKDF2(password, salt, iterations)`, `StoredKey = H(HMAC(SaltedPassword,
//! "Client Key"))`, `ServerKey = HMAC(SaltedPassword, "Server Key")`. Passwords are used as
//! their UTF-8 bytes (no SASLprep normalisation).

use std::num::NonZeroU32;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::{digest, hmac, pbkdf2};

/// PBKDF2 iterations `tributary passwd` uses by default (Kafka's and RFC 7677's minimum).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Iterations accepted in an entry: fewer makes offline guessing cheap, more makes every login
/// (PLAIN and MQTT passwords run PBKDF2 once) slow on a small gateway.
pub const ITERATIONS_MIN: u32 = 4096;
pub const ITERATIONS_MAX: u32 = 1_000_000;
const SALT_BYTES: usize = 16;

/// The hash function of a SCRAM mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub const ALL: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Sha512];

    /// The prefix in `password_hash`.
    pub fn tag(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "scram-sha-256",
            Algorithm::Sha512 => "scram-sha-512",
        }
    }

    pub(crate) fn pbkdf2(self) -> pbkdf2::Algorithm {
        match self {
            Algorithm::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            Algorithm::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }

    pub(crate) fn hmac(self) -> hmac::Algorithm {
        match self {
            Algorithm::Sha256 => hmac::HMAC_SHA256,
            Algorithm::Sha512 => hmac::HMAC_SHA512,
        }
    }

    pub(crate) fn digest(self) -> &'static digest::Algorithm {
        match self {
            Algorithm::Sha256 => &digest::SHA256,
            Algorithm::Sha512 => &digest::SHA512,
        }
    }

    pub(crate) fn len(self) -> usize {
        self.digest().output_len()
    }
}

/// One mechanism's salted keys.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub algorithm: Algorithm,
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of logs.
        f.debug_struct("ScramKeys").field("algorithm", &self.algorithm).field("iterations", &self.iterations).finish()
    }
}

pub(crate) fn hmac_sign(alg: Algorithm, key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(alg.hmac(), key), data).as_ref().to_vec()
}

/// Equality in time independent of where the inputs differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn salted_password(alg: Algorithm, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut out = vec![0u8; alg.len()];
    let n = NonZeroU32::new(iterations.max(1)).unwrap_or(NonZeroU32::MIN);
    pbkdf2::derive(alg.pbkdf2(), n, salt, password, &mut out);
    out
}

impl ScramKeys {
    /// Derives the keys of `password` with a fresh random salt.
    pub fn derive(alg: Algorithm, password: &[u8], iterations: u32) -> Result<Self, String> {
        let mut salt = vec![0u8; SALT_BYTES];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .map_err(|_| "the system random number generator failed".to_string())?;
        Ok(Self::derive_with_salt(alg, password, &salt, iterations))
    }

    pub fn derive_with_salt(alg: Algorithm, password: &[u8], salt: &[u8], iterations: u32) -> Self {
        let salted = salted_password(alg, password, salt, iterations);
        let client_key = hmac_sign(alg, &salted, b"Client Key");
        let stored_key = digest::digest(alg.digest(), &client_key).as_ref().to_vec();
        let server_key = hmac_sign(alg, &salted, b"Server Key");
        Self { algorithm: alg, iterations, salt: salt.to_vec(), stored_key, server_key }
    }

    /// Whether `password` is the one these keys were derived from (one PBKDF2 run).
    pub fn verify(&self, password: &[u8]) -> bool {
        let salted = salted_password(self.algorithm, password, &self.salt, self.iterations);
        let client_key = hmac_sign(self.algorithm, &salted, b"Client Key");
        constant_time_eq(digest::digest(self.algorithm.digest(), &client_key).as_ref(), &self.stored_key)
    }

    fn encode(&self) -> String {
        format!(
            "{}:{}:{}:{}:{}",
            self.algorithm.tag(),
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(&self.stored_key),
            B64.encode(&self.server_key)
        )
    }
}

/// A user's stored credentials: keys for SHA-256, SHA-512 or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordHash {
    pub keys: Vec<ScramKeys>,
}

impl PasswordHash {
    /// An entry for `password` with both algorithms (what `tributary passwd` prints).
    pub fn new(password: &[u8], iterations: u32) -> Result<Self, String> {
        if !(ITERATIONS_MIN..=ITERATIONS_MAX).contains(&iterations) {
            return Err(format!("iterations must be between {ITERATIONS_MIN} and {ITERATIONS_MAX}"));
        }
        let keys =
            Algorithm::ALL.iter().map(|&a| ScramKeys::derive(a, password, iterations)).collect::<Result<_, _>>()?;
        Ok(Self { keys })
    }

    pub fn keys(&self, alg: Algorithm) -> Option<&ScramKeys> {
        self.keys.iter().find(|k| k.algorithm == alg)
    }

    /// Checks a clear-text password (PLAIN, MQTT) with the cheapest algorithm present.
    pub fn verify(&self, password: &[u8]) -> bool {
        self.keys(Algorithm::Sha256).or_else(|| self.keys.first()).is_some_and(|k| k.verify(password))
    }

    /// Parses the `password_hash` text; the error says what is wrong (never echoing the keys).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys: Vec<ScramKeys> = Vec::new();
        for part in text.split_whitespace() {
            let fields: Vec<&str> = part.split(':').collect();
            let [tag, iterations, salt, stored, server] = fields[..] else {
                return Err("each part must be <scheme>:<iterations>:<salt>:<StoredKey>:<ServerKey>".into());
            };
            let algorithm = Algorithm::ALL
                .into_iter()
                .find(|a| a.tag() == tag)
                .ok_or_else(|| format!("unknown scheme {tag:?} (expected scram-sha-256 or scram-sha-512)"))?;
            if keys.iter().any(|k| k.algorithm == algorithm) {
                return Err(format!("{tag} given twice"));
            }
            let iterations: u32 = iterations.parse().map_err(|_| format!("{tag}: iterations is not a number"))?;
            if !(ITERATIONS_MIN..=ITERATIONS_MAX).contains(&iterations) {
                return Err(format!("{tag}: iterations must be between {ITERATIONS_MIN} and {ITERATIONS_MAX}"));
            }
            let b64 = |what: &str, s: &str| B64.decode(s).map_err(|_| format!("{tag}: {what} is not base64"));
            let salt = b64("salt", salt)?;
            if salt.len() < 8 {
                return Err(format!("{tag}: salt shorter than 8 bytes"));
            }
            let (stored_key, server_key) = (b64("StoredKey", stored)?, b64("ServerKey", server)?);
            if stored_key.len() != algorithm.len() || server_key.len() != algorithm.len() {
                return Err(format!("{tag}: keys must be {} bytes", algorithm.len()));
            }
            keys.push(ScramKeys { algorithm, iterations, salt, stored_key, server_key });
        }
        if keys.is_empty() {
            return Err("empty (use `tributary passwd USER` to make an entry)".into());
        }
        Ok(Self { keys })
    }

    pub fn encode(&self) -> String {
        self.keys.iter().map(ScramKeys::encode).collect::<Vec<_>>().join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7677_test_vector() {
        // RFC 7677 section 3: user "user", password "pencil", salt and iterations from the example.
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("b64");
        let k = ScramKeys::derive_with_salt(Algorithm::Sha256, b"pencil", &salt, 4096);
        // ServerSignature of the example's AuthMessage.
        let auth = "n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let sig = hmac_sign(Algorithm::Sha256, &k.server_key, auth.as_bytes());
        assert_eq!(B64.encode(sig), "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
        assert!(k.verify(b"pencil"));
        assert!(!k.verify(b"pencil2"));
    }

    #[test]
    fn entries_round_trip_and_verify() {
        let h = PasswordHash::new(b"s3cret", 4096).expect("hash");
        let text = h.encode();
        assert!(text.starts_with("scram-sha-256:4096:") && text.contains(" scram-sha-512:4096:"), "{text}");
        let back = PasswordHash::parse(&text).expect("parse");
        assert_eq!(back, h);
        assert!(back.verify(b"s3cret"));
        assert!(!back.verify(b"s3cret "));
        assert!(!format!("{back:?}").contains(&B64.encode(&h.keys[0].stored_key)), "keys stay out of Debug");
        // One algorithm alone is a valid entry.
        let only512 = text.split(' ').nth(1).expect("second part");
        assert!(PasswordHash::parse(only512).expect("512 only").verify(b"s3cret"));
    }

    /// What one login costs (PLAIN/MQTT: one PBKDF2 run; SCRAM: the client runs PBKDF2, the
    /// server two HMACs and a hash). `cargo test --release -p tributary-broker login_cost -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn login_cost() {
        for alg in Algorithm::ALL {
            let k = ScramKeys::derive_with_salt(alg, b"pw", b"saltsaltsalt", DEFAULT_ITERATIONS);
            let n = 50;
            let t = std::time::Instant::now();
            for _ in 0..n {
                assert!(k.verify(b"pw"));
            }
            println!(
                "{}: {:.2} ms per password check ({} iterations)",
                alg.tag(),
                t.elapsed().as_secs_f64() * 1e3 / f64::from(n),
                DEFAULT_ITERATIONS
            );
        }
    }

    #[test]
    fn bad_entries_say_why() {
        for (text, why) in [
            ("", "empty"),
            ("plain:secret", "each part"),
            ("scram-sha-1:4096:AAAAAAAAAAA=:AA==:AA==", "unknown scheme"),
            ("scram-sha-256:10:AAAAAAAAAAA=:AA==:AA==", "iterations"),
            ("scram-sha-256:4096:!!:AA==:AA==", "salt is not base64"),
            ("scram-sha-256:4096:AAAAAAAAAAA=:AA==:AA==", "keys must be 32 bytes"),
        ] {
            let e = PasswordHash::parse(text).expect_err(text);
            assert!(e.contains(why), "{text}: {e}");
        }
        assert!(PasswordHash::new(b"x", 10).is_err());
    }
}
