//! SASL server mechanisms, sans-I/O: PLAIN (RFC 4616) and SCRAM-SHA-256/512 (RFC 5802, 7677)
//! as a state machine fed with the client's messages. Password checks (PBKDF2) are left to the
//! caller, which runs them off the async workers; an unknown user goes through SCRAM with a
//! salt derived from the name, so the exchange does not tell which users exist.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::digest;

use super::password::{constant_time_eq, hmac_sign, Algorithm, ScramKeys, DEFAULT_ITERATIONS};

/// A SASL mechanism the broker serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Scram(Algorithm),
}

impl Mechanism {
    pub const ALL: [Mechanism; 3] =
        [Mechanism::Plain, Mechanism::Scram(Algorithm::Sha256), Mechanism::Scram(Algorithm::Sha512)];

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Scram(Algorithm::Sha256) => "SCRAM-SHA-256",
            Mechanism::Scram(Algorithm::Sha512) => "SCRAM-SHA-512",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// PLAIN's one message: `[authzid] NUL authcid NUL passwd`. The authorization id must be empty
/// or the user's own name.
pub fn parse_plain(msg: &[u8]) -> Result<(String, Vec<u8>), String> {
    let mut parts = msg.splitn(3, |b| *b == 0);
    let (Some(authzid), Some(user), Some(password)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("malformed PLAIN message".into());
    };
    let user = std::str::from_utf8(user).map_err(|_| "user name is not UTF-8".to_string())?;
    if user.is_empty() {
        return Err("empty user name".into());
    }
    if !authzid.is_empty() && authzid != user.as_bytes() {
        return Err("authorization id differs from the user name".into());
    }
    Ok((user.to_string(), password.to_vec()))
}

/// What the SCRAM server answers to a client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScramStep {
    /// Send this and wait for the next client message.
    Continue(Vec<u8>),
    /// Authenticated as `user`; send the server-final message.
    Done { user: String, server_final: Vec<u8> },
    /// Refused; the reason is for the log, the client gets a generic failure.
    Failed(String),
}

#[derive(Debug)]
enum State {
    ClientFirst,
    ClientFinal { user: String, keys: Option<ScramKeys>, gs2_header: String, nonce: String, auth_prefix: String },
    Finished,
}

/// The server side of one SCRAM exchange.
#[derive(Debug)]
pub struct ScramServer {
    algorithm: Algorithm,
    state: State,
}

/// `saslname` unescaping: `=2C` is `,` and `=3D` is `=`; any other `=` is invalid.
fn unescape_name(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err("invalid escape in user name".into()),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

impl ScramServer {
    pub fn new(algorithm: Algorithm) -> Self {
        Self { algorithm, state: State::ClientFirst }
    }

    /// Feeds the next client message. `lookup` gives the user's keys for this algorithm;
    /// `fake_salt` a stable salt for names without keys; `server_nonce` fresh printable random.
    pub fn step(
        &mut self,
        msg: &[u8],
        lookup: impl FnOnce(&str) -> Option<ScramKeys>,
        fake_salt: impl FnOnce(&str) -> Vec<u8>,
        server_nonce: impl FnOnce() -> String,
    ) -> ScramStep {
        let Ok(msg) = std::str::from_utf8(msg) else {
            self.state = State::Finished;
            return ScramStep::Failed("SCRAM message is not UTF-8".into());
        };
        match std::mem::replace(&mut self.state, State::Finished) {
            State::ClientFirst => match self.client_first(msg, lookup, fake_salt, server_nonce) {
                Ok(reply) => ScramStep::Continue(reply.into_bytes()),
                Err(e) => ScramStep::Failed(e),
            },
            State::ClientFinal { user, keys, gs2_header, nonce, auth_prefix } => {
                match self.client_final(msg, keys, &gs2_header, &nonce, &auth_prefix) {
                    Ok(server_final) => ScramStep::Done { user, server_final: server_final.into_bytes() },
                    Err(e) => ScramStep::Failed(format!("user {user:?}: {e}")),
                }
            }
            State::Finished => ScramStep::Failed("SCRAM exchange already finished".into()),
        }
    }

    fn client_first(
        &mut self,
        msg: &str,
        lookup: impl FnOnce(&str) -> Option<ScramKeys>,
        fake_salt: impl FnOnce(&str) -> Vec<u8>,
        server_nonce: impl FnOnce() -> String,
    ) -> Result<String, String> {
        let mut parts = msg.splitn(3, ',');
        let (Some(flag), Some(authzid), Some(bare)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("malformed client-first message".into());
        };
        if flag.starts_with("p=") {
            return Err("channel binding is not supported".into());
        }
        if flag != "n" && flag != "y" {
            return Err("malformed GS2 header".into());
        }
        let mut attrs = bare.split(',');
        let user = match attrs.next().and_then(|a| a.strip_prefix("n=")) {
            Some(u) if !u.is_empty() => unescape_name(u)?,
            _ => return Err("client-first message without a user name".into()),
        };
        let client_nonce = match attrs.next().and_then(|a| a.strip_prefix("r=")) {
            Some(r) if !r.is_empty() && r.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') => r,
            _ => return Err("client-first message without a valid nonce".into()),
        };
        // Extensions: Kafka's delegation tokens (tokenauth=true) are not served.
        if attrs.any(|a| a == "tokenauth=true") {
            return Err("delegation tokens are not supported".into());
        }
        if let Some(z) = authzid.strip_prefix("a=") {
            if unescape_name(z)? != user {
                return Err("authorization id differs from the user name".into());
            }
        } else if !authzid.is_empty() {
            return Err("malformed GS2 header".into());
        }
        let keys = lookup(&user);
        let (salt, iterations) = match &keys {
            Some(k) => (k.salt.clone(), k.iterations),
            None => (fake_salt(&user), DEFAULT_ITERATIONS),
        };
        let nonce = format!("{client_nonce}{}", server_nonce());
        let server_first = format!("r={nonce},s={},i={iterations}", B64.encode(salt));
        self.state = State::ClientFinal {
            user,
            keys,
            gs2_header: format!("{flag},{authzid},"),
            nonce,
            auth_prefix: format!("{bare},{server_first}"),
        };
        Ok(server_first)
    }

    fn client_final(
        &self,
        msg: &str,
        keys: Option<ScramKeys>,
        gs2_header: &str,
        nonce: &str,
        auth_prefix: &str,
    ) -> Result<String, String> {
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or("client-final message without a proof")?;
        let mut attrs = without_proof.split(',');
        if attrs.next() != Some(format!("c={}", B64.encode(gs2_header)).as_str()) {
            return Err("channel binding data does not match the GS2 header".into());
        }
        // Kafka accepts a final nonce that ends with the full nonce, and librdkafka 2.0 (Debian's
        // kcat) relies on it: it sends the client nonce twice. The server's part is still there.
        if !attrs.next().and_then(|r| r.strip_prefix("r=")).is_some_and(|r| r.ends_with(nonce)) {
            return Err("nonce does not match".into());
        }
        let proof = B64.decode(proof).map_err(|_| "proof is not base64")?;
        let keys = keys.ok_or("unknown user")?;
        let auth_message = format!("{auth_prefix},{without_proof}");
        let signature = hmac_sign(self.algorithm, &keys.stored_key, auth_message.as_bytes());
        if proof.len() != signature.len() {
            return Err("invalid credentials".into());
        }
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(p, s)| p ^ s).collect();
        if !constant_time_eq(digest::digest(self.algorithm.digest(), &client_key).as_ref(), &keys.stored_key) {
            return Err("invalid credentials".into());
        }
        let server_signature = hmac_sign(self.algorithm, &keys.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 section 3, the whole exchange.
    #[test]
    fn rfc7677_exchange() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("b64");
        let keys = ScramKeys::derive_with_salt(Algorithm::Sha256, b"pencil", &salt, 4096);
        let mut s = ScramServer::new(Algorithm::Sha256);
        let first = s.step(
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            |u| (u == "user").then(|| keys.clone()),
            |_| unreachable!(),
            || "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
        );
        assert_eq!(
            first,
            ScramStep::Continue(
                b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".to_vec()
            )
        );
        let last = s.step(
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            |_| None,
            |_| Vec::new(),
            String::new,
        );
        assert_eq!(
            last,
            ScramStep::Done {
                user: "user".into(),
                server_final: b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=".to_vec()
            }
        );
    }

    #[test]
    fn wrong_proof_unknown_user_and_malformed_messages_fail() {
        let keys = ScramKeys::derive_with_salt(Algorithm::Sha512, b"right", b"saltsalt", 4096);
        let run = |user: &str, proof: &str| {
            let mut s = ScramServer::new(Algorithm::Sha512);
            let k = keys.clone();
            let ScramStep::Continue(first) = s.step(
                format!("n,,n={user},r=abc").as_bytes(),
                |u| (u == "alice").then_some(k),
                |_| b"fakesalt".to_vec(),
                || "xyz".into(),
            ) else {
                panic!("first step")
            };
            let first = String::from_utf8(first).expect("utf-8");
            assert!(first.starts_with("r=abcxyz,s="), "{first}");
            s.step(format!("c=biws,r=abcxyz,p={proof}").as_bytes(), |_| None, |_| Vec::new(), String::new)
        };
        let zero = B64.encode([0u8; 64]);
        assert!(matches!(run("alice", &zero), ScramStep::Failed(e) if e.contains("invalid credentials")));
        assert!(matches!(run("mallory", &zero), ScramStep::Failed(e) if e.contains("unknown user")));
        for bad in [&b"p=tls-unique,,n=a,r=x"[..], b"n,,r=x", b"n,,n=a", b"x,,n=a,r=b", b"n,,n=a=,r=b", b"\xff"] {
            let mut s = ScramServer::new(Algorithm::Sha256);
            let step = s.step(bad, |_| None, |_| Vec::new(), String::new);
            assert!(matches!(step, ScramStep::Failed(_)), "{bad:?}: {step:?}");
        }
        assert_eq!(unescape_name("a=2Cb=3Dc"), Ok("a,b=c".into()));
        // A final message whose nonce lacks the server's part fails.
        let mut s = ScramServer::new(Algorithm::Sha256);
        let _ = s.step(b"n,,n=a,r=abc", |_| None, |_| b"salt".to_vec(), || "xyz".into());
        let step = s.step(b"c=biws,r=abc,p=AAAA", |_| None, |_| Vec::new(), String::new);
        assert!(matches!(&step, ScramStep::Failed(e) if e.contains("nonce")), "{step:?}");
    }

    #[test]
    fn plain_messages() {
        assert_eq!(parse_plain(b"\0alice\0pw"), Ok(("alice".into(), b"pw".to_vec())));
        assert_eq!(parse_plain(b"alice\0alice\0p\0w"), Ok(("alice".into(), b"p\0w".to_vec())));
        assert!(parse_plain(b"bob\0alice\0pw").is_err());
        assert!(parse_plain(b"\0\0pw").is_err());
        assert!(parse_plain(b"alice").is_err());
    }
}
