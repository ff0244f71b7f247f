//! SASL authentication of a Kafka connection: SaslHandshake picks the mechanism, then the
//! tokens arrive in SaslAuthenticate requests (handshake v1) or bare (handshake v0), and the
//! connection is served as its user once the mechanism succeeds. A failure is answered
//! `auth.failure_delay_ms` after the token that failed arrived (whatever the user, known or not,
//! and however long the client waited after its handshake), counted, and closes the connection
//! (as Kafka does).

use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{SaslAuthenticateResponse, SaslHandshakeResponse};
use kafka_protocol::protocol::StrBytes;

use crate::kafka::context::{encode, ready, Call, Ctx, PendingReply, Reply};
use crate::kafka::errors;
use crate::security::sasl::{parse_plain, ScramServer, ScramStep};
use crate::security::{nonce, Access, Mechanism, User};

/// Where a connection is in its authentication.
#[derive(Debug)]
pub(crate) enum SaslState {
    /// Waiting for SaslHandshake.
    Start,
    /// Mechanism chosen; `raw` = tokens come bare (handshake v0).
    Mechanism { mechanism: Mechanism, scram: Option<Box<ScramServer>>, raw: bool },
    /// Authenticated (or authentication is off).
    Done,
}

/// Per-connection security state.
#[derive(Debug)]
pub(crate) struct ConnAuth {
    pub state: SaslState,
    /// `None` until authenticated.
    pub access: Option<Access>,
    /// Set after a refusal: the response goes out, then the connection closes.
    pub close: bool,
}

impl ConnAuth {
    pub(crate) fn new(ctx: &Ctx) -> Self {
        if ctx.auth.enabled() {
            Self { state: SaslState::Start, access: None, close: false }
        } else {
            Self { state: SaslState::Done, access: Some(Access::All), close: false }
        }
    }

    /// Whether the next frame is a bare SASL token (after a v0 handshake).
    pub(crate) fn raw(&self) -> bool {
        matches!(self.state, SaslState::Mechanism { raw: true, .. })
    }
}

enum Outcome {
    Continue(Vec<u8>),
    Authenticated(Arc<User>, Vec<u8>),
    Failed(String),
}

fn mechanism_names() -> Vec<StrBytes> {
    Mechanism::ALL.iter().map(|m| StrBytes::from_static_str(m.name())).collect()
}

/// SaslHandshake: answered at once.
pub(crate) fn handshake(conn: &mut ConnAuth, call: Call, mechanism: String) -> PendingReply {
    let mut resp = SaslHandshakeResponse::default().with_mechanisms(mechanism_names());
    match (&conn.state, Mechanism::from_name(&mechanism)) {
        (SaslState::Start, Some(m)) => {
            let scram = match m {
                Mechanism::Plain => None,
                Mechanism::Scram(alg) => Some(Box::new(ScramServer::new(alg))),
            };
            conn.state = SaslState::Mechanism { mechanism: m, scram, raw: call.version == 0 };
        }
        (SaslState::Start, None) => {
            tracing::warn!(peer = %call.peer, %mechanism, "kafka client asked for an unsupported SASL mechanism");
            resp.error_code = errors::UNSUPPORTED_SASL_MECHANISM;
            conn.close = true;
        }
        _ => {
            resp.error_code = errors::ILLEGAL_SASL_STATE;
            conn.close = true;
        }
    }
    match encode(&call, &resp) {
        Ok(bytes) => ready(Reply::one(bytes, vec![call.permit])),
        Err(e) => Box::pin(async move { Err(e) }),
    }
}

async fn step(ctx: &Ctx, conn: &mut ConnAuth, token: &[u8]) -> Result<Outcome, String> {
    let SaslState::Mechanism { mechanism, scram, .. } = &mut conn.state else {
        return Err("SASL token before SaslHandshake".into());
    };
    Ok(match (mechanism, scram) {
        (Mechanism::Plain, _) => match parse_plain(token) {
            Ok((user, password)) => match ctx.auth.check_password(&user, &password).await {
                Ok(u) => Outcome::Authenticated(u, Vec::new()),
                Err(e) => Outcome::Failed(format!("user {user:?}: {e}")),
            },
            Err(e) => Outcome::Failed(e),
        },
        (Mechanism::Scram(alg), Some(server)) => {
            let alg = *alg;
            match server.step(token, |u| ctx.auth.scram_keys(u, alg), |u| ctx.auth.fake_salt(u), nonce) {
                ScramStep::Continue(reply) => Outcome::Continue(reply),
                ScramStep::Done { user, server_final } => match ctx.auth.user(&user) {
                    Some(u) => Outcome::Authenticated(u, server_final),
                    None => Outcome::Failed(format!("user {user:?} no longer exists")),
                },
                ScramStep::Failed(e) => Outcome::Failed(e),
            }
        }
        (Mechanism::Scram(_), None) => Outcome::Failed("SCRAM state missing".into()),
    })
}

/// Runs one token through the mechanism; on success the connection is served as the user, on
/// failure the answer waits for the failure delay. The delay counts from this token's arrival
/// (`started`, taken when its frame was read), not from the handshake: a client that waits
/// before sending its token must not see the password check's own duration (a PBKDF2 run for a
/// known user, nothing for an unknown one) in the answer's timing.
async fn authenticate(
    ctx: &Ctx,
    conn: &mut ConnAuth,
    token: &[u8],
    peer: std::net::SocketAddr,
    started: Instant,
) -> Outcome {
    let mechanism = match &conn.state {
        SaslState::Mechanism { mechanism, .. } => *mechanism,
        _ => Mechanism::Plain,
    };
    let outcome = step(ctx, conn, token).await.unwrap_or_else(Outcome::Failed);
    match &outcome {
        Outcome::Continue(_) => {}
        Outcome::Authenticated(u, _) => {
            tracing::debug!(%peer, user = %u.name, mechanism = mechanism.name(), "kafka client authenticated");
            conn.access = Some(Access::User(u.clone()));
            conn.state = SaslState::Done;
        }
        Outcome::Failed(reason) => {
            ctx.stats.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(%peer, mechanism = mechanism.name(), %reason, "kafka SASL authentication failed");
            ctx.store.refusals().record(
                crate::storage::refusals::RefusalKind::Login,
                "kafka",
                &peer.ip().to_string(),
                &format!("SASL {}: {reason}", mechanism.name()),
            );
            conn.state = SaslState::Done;
            conn.close = true;
            ctx.auth.delay_failure(started).await;
        }
    }
    outcome
}

/// SaslAuthenticate (handshake v1 and later).
pub(crate) async fn authenticate_request(
    ctx: &Ctx,
    conn: &mut ConnAuth,
    call: Call,
    token: Bytes,
    started: Instant,
) -> PendingReply {
    let mut resp = SaslAuthenticateResponse::default();
    if !matches!(conn.state, SaslState::Mechanism { raw: false, .. }) {
        resp.error_code = errors::ILLEGAL_SASL_STATE;
        resp.error_message = Some(StrBytes::from_static_str("SaslAuthenticate without a SaslHandshake v1"));
        conn.close = true;
    } else {
        let mechanism = match &conn.state {
            SaslState::Mechanism { mechanism, .. } => mechanism.name(),
            _ => "",
        };
        match authenticate(ctx, conn, &token, call.peer, started).await {
            Outcome::Continue(b) | Outcome::Authenticated(_, b) => resp.auth_bytes = Bytes::from(b),
            Outcome::Failed(_) => {
                resp.error_code = errors::SASL_AUTHENTICATION_FAILED;
                resp.error_message = Some(StrBytes::from_string(format!(
                    "Authentication failed during authentication due to invalid credentials with SASL mechanism {mechanism}"
                )));
            }
        }
    }
    match encode(&call, &resp) {
        Ok(bytes) => ready(Reply::one(bytes, vec![call.permit])),
        Err(e) => Box::pin(async move { Err(e) }),
    }
}

/// A bare token after a v0 handshake; the answer is a bare token too (a failure closes the
/// connection without one, as Kafka does).
pub(crate) async fn authenticate_raw(
    ctx: &Ctx,
    conn: &mut ConnAuth,
    token: Bytes,
    permit: tokio::sync::OwnedSemaphorePermit,
    peer: std::net::SocketAddr,
    started: Instant,
) -> PendingReply {
    match authenticate(ctx, conn, &token, peer, started).await {
        Outcome::Continue(b) | Outcome::Authenticated(_, b) => {
            let mut out = BytesMut::with_capacity(4 + b.len());
            out.put_u32(b.len() as u32);
            out.put_slice(&b);
            ready(Reply::one(out.freeze(), vec![permit]))
        }
        Outcome::Failed(_) => Box::pin(async { Ok(None) }),
    }
}
