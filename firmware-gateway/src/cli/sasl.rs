//! The client side of SASL for a gateway with `[auth]` on: PLAIN, and SCRAM-SHA-256/512
//! (RFC 5802, RFC 7677; the password never crosses the wire and the server proves it knows the
//! user's keys). Sans-I/O: the caller carries the messages in SaslAuthenticate requests.

use std::num::NonZeroU32;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::{digest, hmac, pbkdf2};

/// The mechanisms this client speaks, by their SASL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mechanism {
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
    #[value(name = "PLAIN")]
    Plain,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha512 => "SCRAM-SHA-512",
            Mechanism::Plain => "PLAIN",
        }
    }
}

/// Iterations a server may ask for: RFC 7677's minimum up to what a gateway's PBKDF2 allows.
const ITERATIONS: std::ops::RangeInclusive<u32> = 4096..=1_000_000;

/// One authentication exchange.
#[derive(Debug)]
pub struct SaslClient {
    mechanism: Mechanism,
    user: String,
    password: String,
    state: State,
}

#[derive(Debug)]
enum State {
    Start,
    /// SCRAM: client-first sent.
    First {
        client_nonce: String,
        first_bare: String,
    },
    /// SCRAM: client-final sent; the server's signature to expect.
    Final {
        server_signature: Vec<u8>,
    },
    Done,
}

/// What to do after a server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this message.
    Send(Vec<u8>),
    /// Authenticated (nothing more to send).
    Done,
}

impl SaslClient {
    pub fn new(mechanism: Mechanism, user: &str, password: &str) -> Self {
        Self { mechanism, user: user.to_string(), password: password.to_string(), state: State::Start }
    }

    /// The first message.
    pub fn start(&mut self) -> Result<Vec<u8>, String> {
        let nonce = random_nonce()?;
        Ok(self.start_with_nonce(nonce))
    }

    fn start_with_nonce(&mut self, client_nonce: String) -> Vec<u8> {
        match self.mechanism {
            Mechanism::Plain => {
                self.state = State::Done;
                format!("\0{}\0{}", self.user, self.password).into_bytes()
            }
            Mechanism::ScramSha256 | Mechanism::ScramSha512 => {
                let name = self.user.replace('=', "=3D").replace(',', "=2C");
                let first_bare = format!("n={name},r={client_nonce}");
                let msg = format!("n,,{first_bare}").into_bytes();
                self.state = State::First { client_nonce, first_bare };
                msg
            }
        }
    }

    /// Takes the server's next message.
    pub fn step(&mut self, server: &[u8]) -> Result<Step, String> {
        let server = std::str::from_utf8(server).map_err(|_| "the server's SASL message is not UTF-8".to_string())?;
        match std::mem::replace(&mut self.state, State::Done) {
            State::Start => Err("SASL exchange not started".into()),
            State::First { client_nonce, first_bare } => self.client_final(server, &client_nonce, &first_bare),
            State::Final { server_signature } => {
                if let Some(e) = server.strip_prefix("e=") {
                    return Err(format!("the server refused: {e}"));
                }
                let v = server.strip_prefix("v=").ok_or("malformed server-final message")?;
                let v = B64.decode(v.split(',').next().unwrap_or_default()).map_err(|_| "bad server signature")?;
                if v != server_signature {
                    return Err("the server's SCRAM signature is wrong: it does not know this user's keys".into());
                }
                Ok(Step::Done)
            }
            // PLAIN: the server's (empty) answer ends it.
            State::Done => Ok(Step::Done),
        }
    }

    fn client_final(&mut self, server_first: &str, client_nonce: &str, first_bare: &str) -> Result<Step, String> {
        let (hmac_alg, pbkdf2_alg, digest_alg) = match self.mechanism {
            Mechanism::ScramSha512 => (hmac::HMAC_SHA512, pbkdf2::PBKDF2_HMAC_SHA512, &digest::SHA512),
            _ => (hmac::HMAC_SHA256, pbkdf2::PBKDF2_HMAC_SHA256, &digest::SHA256),
        };
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attr in server_first.split(',') {
            match attr.split_at_checked(2) {
                Some(("r=", v)) => nonce = Some(v),
                Some(("s=", v)) => salt = Some(B64.decode(v).map_err(|_| "bad salt in server-first message")?),
                Some(("i=", v)) => iterations = v.parse::<u32>().ok(),
                _ => {}
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err("malformed server-first message".into());
        };
        if !nonce.starts_with(client_nonce) || nonce.len() == client_nonce.len() {
            return Err("the server's nonce does not extend ours".into());
        }
        if !ITERATIONS.contains(&iterations) {
            return Err(format!("the server asked for {iterations} iterations (accepted: {ITERATIONS:?})"));
        }
        let mut salted = vec![0u8; digest_alg.output_len()];
        let rounds = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
        pbkdf2::derive(pbkdf2_alg, rounds, &salt, self.password.as_bytes(), &mut salted);
        let sign = |key: &[u8], data: &[u8]| hmac::sign(&hmac::Key::new(hmac_alg, key), data).as_ref().to_vec();
        let client_key = sign(&salted, b"Client Key");
        let stored_key = digest::digest(digest_alg, &client_key);
        let without_proof = format!("c=biws,r={nonce}"); // biws = base64("n,,")
        let auth_message = format!("{first_bare},{server_first},{without_proof}");
        let client_signature = sign(stored_key.as_ref(), auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(&client_signature).map(|(k, s)| k ^ s).collect();
        let server_key = sign(&salted, b"Server Key");
        self.state = State::Final { server_signature: sign(&server_key, auth_message.as_bytes()) };
        Ok(Step::Send(format!("{without_proof},p={}", B64.encode(proof)).into_bytes()))
    }
}

fn random_nonce() -> Result<String, String> {
    let mut bytes = [0u8; 18];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| "the system random number generator failed".to_string())?;
    Ok(B64.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677, section 3.
    #[test]
    fn scram_sha_256_matches_the_rfc_example() {
        let mut c = SaslClient::new(Mechanism::ScramSha256, "user", "pencil");
        let first = c.start_with_nonce("rOprNGfwEbeRWgbNEkqO".into());
        assert_eq!(first, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let Ok(Step::Send(fin)) = c.step(server_first) else { panic!("client-final expected") };
        assert_eq!(
            String::from_utf8(fin).expect("utf-8"),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(c.step(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="), Ok(Step::Done));
    }

    #[test]
    fn a_wrong_server_signature_and_a_foreign_nonce_are_refused() {
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let mut c = SaslClient::new(Mechanism::ScramSha256, "user", "pencil");
        c.start_with_nonce("rOprNGfwEbeRWgbNEkqO".into());
        assert!(matches!(c.step(server_first), Ok(Step::Send(_))));
        assert!(c.step(b"v=AAAA").is_err());
        let mut c = SaslClient::new(Mechanism::ScramSha256, "user", "pencil");
        c.start_with_nonce("other".into());
        assert!(c.step(server_first).is_err());
    }

    #[test]
    fn plain_is_one_message_and_names_are_escaped_for_scram() {
        let mut c = SaslClient::new(Mechanism::Plain, "u", "p");
        assert_eq!(c.start_with_nonce(String::new()), b"\0u\0p");
        assert_eq!(c.step(b""), Ok(Step::Done));
        let mut c = SaslClient::new(Mechanism::ScramSha512, "a,b=c", "p");
        assert_eq!(c.start_with_nonce("n".into()), b"n,,n=a=2Cb=3Dc,r=n");
    }
}
