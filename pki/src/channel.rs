//! gRPC channels over the fleet's TLS, for tills and operators: tonic's own
//! TLS is not used, so that every connection is made with the rustls
//! configuration built here (one provider, the fleet CA, the device's
//! certificate).

use std::sync::{Arc, RwLock};

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_util::either::Either;
use tonic::transport::{Channel, Endpoint, Uri};

/// The TLS configuration a channel's new connections use, replaceable
/// while the channel lives (a renewed certificate): connections already
/// open keep theirs.
#[derive(Clone, Debug)]
pub struct ClientTls(Arc<RwLock<Arc<ClientConfig>>>);

impl ClientTls {
    pub fn new(config: ClientConfig) -> ClientTls {
        ClientTls(Arc::new(RwLock::new(with_h2(config))))
    }

    /// New connections use `config` from now on.
    pub fn replace(&self, config: ClientConfig) {
        *self
            .0
            .write()
            .expect("never poisoned: no panics while held") = with_h2(config);
    }

    fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(
            self.0
                .read()
                .expect("never poisoned: no panics while held")
                .clone(),
        )
    }
}

fn with_h2(mut config: ClientConfig) -> Arc<ClientConfig> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A channel to `endpoint` that connects lazily: over TLS with `tls` (for an
/// `https://` address), else plain TCP.
pub fn grpc_channel(endpoint: &Endpoint, tls: Option<Arc<ClientConfig>>) -> Channel {
    grpc_channel_with(
        endpoint,
        tls.map(|config| ClientTls::new((*config).clone())),
    )
}

/// As [`grpc_channel`], with a TLS configuration that may be replaced while
/// the channel lives.
pub fn grpc_channel_with(endpoint: &Endpoint, tls: Option<ClientTls>) -> Channel {
    let connector = tower::service_fn(move |uri: Uri| {
        let tls = tls.as_ref().map(ClientTls::connector);
        async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other(format!("`{uri}` names no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let default_port = if tls.is_some() { 443 } else { 80 };
            let port = uri.port_u16().unwrap_or(default_port);
            let socket = TcpStream::connect((host.as_str(), port)).await?;
            socket.set_nodelay(true)?;
            let io = match tls {
                Some(connector) => {
                    let name = ServerName::try_from(host.clone()).map_err(|_| {
                        std::io::Error::other(format!("`{host}` is not a server name"))
                    })?;
                    let tls = connector
                        .connect(name, socket)
                        .await
                        .map_err(|error| explain_handshake_error(error, &host, port))?;
                    Either::Left(tls)
                }
                None => Either::Right(socket),
            };
            Ok::<_, std::io::Error>(TokioIo::new(io))
        }
    });
    endpoint.connect_with_connector_lazy(connector)
}

/// A failed handshake, said so that the fix is plain where the cause is
/// known.
fn explain_handshake_error(error: std::io::Error, host: &str, port: u16) -> std::io::Error {
    let text = error.to_string();
    if text.contains("InvalidContentType") {
        return std::io::Error::other(format!(
            "{host}:{port} answered in plaintext, not TLS: a server started with insecure_dev is reached with http://"
        ));
    }
    error
}
