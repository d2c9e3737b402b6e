//! gRPC channels over the fleet's TLS, for tills and operators: tonic's own
//! TLS is not used, so that every connection is made with the rustls
//! configuration built here (one provider, the fleet CA, the device's
//! certificate).

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_util::either::Either;
use tonic::transport::{Channel, Endpoint, Uri};

/// A channel to `endpoint` that connects lazily: over TLS with `tls` (for an
/// `https://` address), else plain TCP.
pub fn grpc_channel(endpoint: &Endpoint, tls: Option<Arc<ClientConfig>>) -> Channel {
    let tls = tls.map(|config| {
        let mut config = (*config).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    });
    let connector = tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
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
