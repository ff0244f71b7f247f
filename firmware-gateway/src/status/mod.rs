//! The status page (`[status]`): a read-only page for the operator on a site visit, served by
//! the metrics listener at `/` from assets compiled into the binary (`page.html`, `page.css`,
//! `page.js`: no CDN, no build step), with `/api/status` (the JSON the page polls every
//! `status.refresh_ms`, see `model.rs`), the history sampler behind its sparklines, and the
//! gate in front of all of it: with `[auth]` on, HTTP Basic login by a user with the `status`
//! right (nothing but the 401 before); with TLS configured on a listener, the page is served to
//! other hosts over TLS only (https on the same port, with that listener's certificate), plain
//! HTTP only to loopback peers.

pub mod model;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tributary_broker::config::check_range;
use tributary_broker::security::Auth;
use tributary_broker::storage::refusals::RefusalKind;
use tributary_broker::ConfigError;

use crate::http::{Request, Response};
use crate::metrics::Sources;
use model::{History, Limits};

/// The page's assets, compiled in.
pub const PAGE_HTML: &str = include_str!("page.html");
pub const PAGE_CSS: &str = include_str!("page.css");
pub const PAGE_JS: &str = include_str!("page.js");
/// Budget of the three assets together (checked by a test): the page must stay small enough for
/// a slow site link and a phone.
pub const ASSETS_BYTES_MAX: usize = 40 * 1024;

/// `[status]` of gateway.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// Serve the page on the metrics listener (needs `[metrics] enabled`).
    pub enabled: bool,
    /// How often the open page asks for fresh figures.
    pub refresh_ms: u64,
    /// Time between two samples of the history (message rates, mirror lag).
    pub history_interval_ms: u64,
    /// Samples kept per series (360 x 10 s = the last hour).
    pub history_samples_max: u32,
    /// Topics with a rate history (the first by name); others show no sparkline.
    pub history_topics_max: u32,
    /// Topics listed (by name); the document counts the others.
    pub topics_max: u32,
    /// Consumer groups listed (by name); the document counts the others.
    pub groups_max: u32,
    /// Recent refusals kept in memory (failed logins, denied publishes, disk full, write faults).
    pub refusals_max: u32,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            refresh_ms: 2000,
            history_interval_ms: 10_000,
            history_samples_max: 360,
            history_topics_max: 32,
            topics_max: 200,
            groups_max: 100,
            refusals_max: 64,
        }
    }
}

impl StatusConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let k = |key: &str| format!("{prefix}.{key}");
        check_range(&k("refresh_ms"), self.refresh_ms, 250, 3_600_000)?;
        check_range(&k("history_interval_ms"), self.history_interval_ms, 100, 3_600_000)?;
        check_range(&k("history_samples_max"), self.history_samples_max.into(), 2, 100_000)?;
        check_range(&k("history_topics_max"), self.history_topics_max.into(), 0, 10_000)?;
        check_range(&k("topics_max"), self.topics_max.into(), 1, 100_000)?;
        check_range(&k("groups_max"), self.groups_max.into(), 0, 100_000)?;
        check_range(&k("refusals_max"), self.refusals_max.into(), 0, 10_000)
    }
}

/// Counters of the page, exported with the metrics.
#[derive(Debug, Default)]
pub struct StatusStats {
    /// Logins to the page refused (wrong credentials, or a user without the `status` right).
    pub auth_failures: AtomicU64,
    /// Requests from peers other than loopback refused because TLS is configured.
    pub plain_http_refused: AtomicU64,
}

/// The page's state, shared by the listener's connections and the sampler.
#[derive(Debug, Clone)]
pub struct Status {
    pub cfg: StatusConfig,
    pub auth: Arc<Auth>,
    /// TLS is configured on a listener (`mqtt.tls` or `kafka.tls`): plain HTTP only from loopback.
    pub tls_configured: bool,
    pub history: Arc<Mutex<History>>,
    pub started: Instant,
    pub stats: Arc<StatusStats>,
}

impl Status {
    pub fn new(cfg: StatusConfig, auth: Arc<Auth>, tls_configured: bool) -> Self {
        let history = History::new(cfg.history_samples_max as usize, cfg.history_topics_max as usize);
        Self {
            cfg,
            auth,
            tls_configured,
            history: Arc::new(Mutex::new(history)),
            started: Instant::now(),
            stats: Arc::default(),
        }
    }

    /// Whether `path` is one of the page's routes.
    pub fn route(path: &str) -> bool {
        matches!(path, "/" | "/index.html" | "/status.css" | "/status.js" | "/api/status")
    }

    /// Answers a GET of one of the page's routes from `peer`, which came over TLS when `secure`.
    pub async fn answer(&self, req: &Request, peer: SocketAddr, secure: bool, src: &Sources) -> Response {
        if let Some(refused) = self.gate(req, peer, secure, src).await {
            return refused;
        }
        let asset = |kind, body: &str| {
            Response::new("200 OK", kind, body).with("Cache-Control", "no-cache").with(
                "Content-Security-Policy",
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; frame-ancestors 'none'",
            )
        };
        let resp = match req.path.as_str() {
            "/status.css" => asset("text/css; charset=utf-8", PAGE_CSS),
            "/status.js" => asset("text/javascript; charset=utf-8", PAGE_JS),
            "/api/status" => {
                let (src, history, started) = (src.clone(), self.history.clone(), self.started);
                let limits = Limits {
                    topics_max: self.cfg.topics_max as usize,
                    groups_max: self.cfg.groups_max as usize,
                    refresh_ms: self.cfg.refresh_ms,
                    history_interval_ms: self.cfg.history_interval_ms,
                    with_history: !req.query.split('&').any(|kv| kv == "history=0"),
                };
                let body = tokio::task::spawn_blocking(move || {
                    let h = history.lock().unwrap_or_else(PoisonError::into_inner);
                    serde_json::to_vec(&model::snapshot(&src, &h, limits, started.elapsed().as_secs()))
                })
                .await;
                match body {
                    Ok(Ok(body)) => Response::new("200 OK", "application/json", body).with("Cache-Control", "no-store"),
                    _ => Response::text("500 Internal Server Error", "status not available\n"),
                }
            }
            _ => asset("text/html; charset=utf-8", PAGE_HTML),
        };
        resp.with("X-Content-Type-Options", "nosniff").with("Referrer-Policy", "no-referrer")
    }

    /// `Some(answer)` when the request may not see the page: plain HTTP from afar with TLS
    /// configured, or no valid login with `[auth]` on (failures are counted, recorded as
    /// refusals and answered after `auth.failure_delay_ms`).
    async fn gate(&self, req: &Request, peer: SocketAddr, secure: bool, src: &Sources) -> Option<Response> {
        // Canonical: on a dual-stack listener a local IPv4 client is ::ffff:127.0.0.1.
        if self.tls_configured && !secure && !peer.ip().to_canonical().is_loopback() {
            self.stats.plain_http_refused.fetch_add(1, Ordering::Relaxed);
            return Some(Response::text(
                "403 Forbidden",
                "TLS is configured: from another host the status page is served over https:// on \
                 this port only\n",
            ));
        }
        if !self.auth.enabled() {
            return None;
        }
        let challenge = || {
            Response::text("401 Unauthorized", "login required\n")
                .with("WWW-Authenticate", "Basic realm=\"tributary status\", charset=\"UTF-8\"")
        };
        let Some((user, password)) = req.header("authorization").and_then(basic_credentials) else {
            return Some(challenge());
        };
        let started = Instant::now();
        let refused = match self.auth.check_password(&user, password.as_bytes()).await {
            Ok(u) if u.status => return None,
            Ok(_) => "the user has no status right".to_string(),
            Err(e) => e.to_string(),
        };
        self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, user = %user, reason = %refused, "status page login refused");
        src.store.refusals().record(RefusalKind::Login, "http", &format!("{} user {user:?}", peer.ip()), &refused);
        self.auth.delay_failure(started).await;
        Some(challenge())
    }
}

/// User and password of an `Authorization: Basic ...` value (RFC 7617, UTF-8).
pub fn basic_credentials(value: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(token.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// Samples the history every `status.history_interval_ms` until `shutdown` resolves.
pub async fn sample(status: Status, src: Sources, shutdown: impl std::future::Future<Output = ()>) {
    let mut tick = tokio::time::interval(Duration::from_millis(status.cfg.history_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        let (src, history) = (src.clone(), status.history.clone());
        let _ = tokio::task::spawn_blocking(move || {
            let (totals, lag) = model::sample_figures(&src);
            let now = tributary_broker::storage::clock::now_ms();
            history.lock().unwrap_or_else(PoisonError::into_inner).sample(now, &totals, lag);
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_assets_stay_within_their_budget_and_load_nothing_from_elsewhere() {
        let total = PAGE_HTML.len() + PAGE_CSS.len() + PAGE_JS.len();
        assert!(total <= ASSETS_BYTES_MAX, "status page assets are {total} bytes, budget {ASSETS_BYTES_MAX}");
        for (name, text) in [("page.html", PAGE_HTML), ("page.css", PAGE_CSS), ("page.js", PAGE_JS)] {
            // The SVG namespace name is an identifier, not a fetch.
            let text = text.replace("'http://www.w3.org/2000/svg'", "");
            assert!(!text.contains("http://") && !text.contains("https://"), "{name} refers to another site");
            assert!(!text.contains("//cdn") && !text.contains("src=\"//"), "{name} loads from another site");
        }
        assert!(PAGE_HTML.contains("name=\"viewport\""), "the page sets a viewport for phones");
        assert!(!PAGE_JS.contains("innerHTML"), "client strings are set as text, never as markup");
    }

    /// With TLS configured on a listener, the page's plain HTTP is for this host only: every
    /// route answers a peer elsewhere 403 (counted) unless the request came over TLS; loopback
    /// peers (v4 and v6) get the page either way.
    #[tokio::test]
    async fn with_tls_configured_plain_http_is_served_to_loopback_peers_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = tributary_broker::StorageConfig {
            data_dir: dir.path().into(),
            disk_free_bytes_min: 0,
            ..Default::default()
        };
        let (store, _) = tributary_broker::Store::open(storage).expect("open");
        let src = Sources::store_only(store.clone());
        let get = |path: &str| {
            crate::http::parse_head(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes(), 1024)
                .expect("valid")
                .expect("complete")
        };
        for tls in [true, false] {
            let status = Status::new(StatusConfig::default(), Auth::disabled(), tls);
            for path in ["/", "/status.js", "/api/status"] {
                for peer in ["192.0.2.7:40000", "[2001:db8::1]:40000"] {
                    let r = status.answer(&get(path), peer.parse().expect("addr"), false, &src).await;
                    let want = if tls { "403 Forbidden" } else { "200 OK" };
                    assert_eq!(r.status, want, "tls {tls}, {peer} {path}");
                    let r = status.answer(&get(path), peer.parse().expect("addr"), true, &src).await;
                    assert_eq!(r.status, "200 OK", "over TLS: tls {tls}, {peer} {path}");
                }
                for peer in ["127.0.0.1:40000", "[::1]:40000", "[::ffff:127.0.0.1]:40000"] {
                    let r = status.answer(&get(path), peer.parse().expect("addr"), false, &src).await;
                    assert_eq!(r.status, "200 OK", "tls {tls}, {peer} {path}");
                }
            }
            let refused = status.stats.plain_http_refused.load(Ordering::Relaxed);
            assert_eq!(refused, if tls { 6 } else { 0 });
        }
        store.close().await.expect("close");
    }

    #[test]
    fn basic_credentials_are_decoded() {
        // "alice:pa:ss" in base64.
        assert_eq!(basic_credentials("Basic YWxpY2U6cGE6c3M="), Some(("alice".into(), "pa:ss".into())));
        assert_eq!(basic_credentials("basic YWxpY2U6cGE6c3M="), Some(("alice".into(), "pa:ss".into())));
        assert_eq!(basic_credentials("Bearer YWxpY2U6cGE6c3M="), None);
        assert_eq!(basic_credentials("Basic !!!"), None);
        assert_eq!(basic_credentials("Basic YWxpY2U="), None, "no colon");
    }

    #[test]
    fn errors_name_the_key() {
        StatusConfig::default().validate("status").expect("defaults");
        let c = StatusConfig { refresh_ms: 10, ..StatusConfig::default() };
        assert_eq!(c.validate("status").expect_err("too often").key, "status.refresh_ms");
        let c = StatusConfig { history_samples_max: 1, ..StatusConfig::default() };
        assert_eq!(c.validate("status").expect_err("one sample").key, "status.history_samples_max");
        let c = StatusConfig { topics_max: 0, ..StatusConfig::default() };
        assert_eq!(c.validate("status").expect_err("none").key, "status.topics_max");
    }
}
