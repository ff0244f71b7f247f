//! The MQTT listener's sockets from `[mqtt]`, bound in a fixed order (plain, TLS, WebSocket,
//! secure WebSocket; each but the first only when configured), and which index is which. TLS and
//! secure WebSocket share one server configuration from `[mqtt.tls]`.

use std::sync::Arc;

use super::config::MqttConfig;
use crate::listener::Socket;
use crate::security::tls;

/// Why a socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub(super) enum BindError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// The bound sockets and the index of each optional one in `sockets`.
#[derive(Debug)]
pub(super) struct Bound {
    pub sockets: Vec<Socket>,
    pub tls: Option<usize>,
    pub websocket: Option<usize>,
    pub websocket_tls: Option<usize>,
}

/// Binds every socket `cfg` asks for.
pub(super) async fn bind(cfg: &MqttConfig) -> Result<Bound, BindError> {
    let bind_err = |addr: &str| {
        let addr = addr.to_string();
        move |source| BindError::Bind { addr, source }
    };
    let mut sockets = vec![Socket::bind(&cfg.listen, None).await.map_err(bind_err(&cfg.listen))?];
    let server = if cfg.tls.enabled || !cfg.websocket_tls_listen.is_empty() {
        Some(tls::server_config(tls::TlsFiles {
            prefix: "mqtt.tls",
            cert_file: &cfg.tls.cert_file,
            key_file: &cfg.tls.key_file,
            client_ca_file: &cfg.tls.client_ca_file,
        })?)
    } else {
        None
    };
    let mut push = |s: Socket| {
        sockets.push(s);
        Some(sockets.len() - 1)
    };
    let mut bound = Bound { sockets: Vec::new(), tls: None, websocket: None, websocket_tls: None };
    if cfg.tls.enabled {
        let s = Socket::bind(&cfg.tls.listen, server.clone()).await.map_err(bind_err(&cfg.tls.listen))?;
        bound.tls = push(s);
    }
    if !cfg.websocket_listen.is_empty() {
        let s = Socket::bind_websocket(&cfg.websocket_listen, None).await.map_err(bind_err(&cfg.websocket_listen))?;
        bound.websocket = push(s);
    }
    if let (false, Some(server)) = (cfg.websocket_tls_listen.is_empty(), server) {
        let s = Socket::bind_websocket(&cfg.websocket_tls_listen, Some(Arc::clone(&server)))
            .await
            .map_err(bind_err(&cfg.websocket_tls_listen))?;
        bound.websocket_tls = push(s);
    }
    bound.sockets = sockets;
    Ok(bound)
}
