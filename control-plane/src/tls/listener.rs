//! The control plane's listeners: TLS terminated here with rustls (not by
//! tonic), so that each connection carries the device its client
//! certificate names, and a device revoked while connected is cut off at
//! once rather than at its next handshake.
//!
//! One accept loop per listener hands finished handshakes to the gRPC or
//! HTTP server as [`Connection`]s. Handshakes run concurrently, at most
//! [`MAX_HANDSHAKES`] at a time (others wait their turn), each connection
//! done within [`HANDSHAKE_TIMEOUT`] of its accept, waiting included, so a
//! client that opens sockets and says nothing holds each for no longer.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use posfleet_pki::{DeviceIdentity, Revocations};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once, per listener.
pub const MAX_HANDSHAKES: usize = 1024;

/// The listener's current TLS configuration: replaced when the server
/// certificate or the trusted CAs change; each handshake takes the one
/// current when it starts.
pub type Acceptor = tokio::sync::watch::Receiver<tokio_rustls::TlsAcceptor>;

/// The remote address of a gRPC or HTTP request's connection.
pub(crate) fn remote_address(extensions: &tonic::codegen::http::Extensions) -> Option<SocketAddr> {
    extensions.get::<Peer>().map(|peer| peer.address)
}

/// The device a request's connection presented a certificate for.
pub(crate) fn device_of(extensions: &tonic::codegen::http::Extensions) -> Option<&DeviceIdentity> {
    extensions
        .get::<Peer>()
        .and_then(|peer| peer.device.as_ref())
}

/// Who is at the other end of a connection: its address, and the device its
/// verified client certificate names, if it presented one.
#[derive(Debug, Clone)]
pub struct Peer {
    pub address: SocketAddr,
    pub device: Option<DeviceIdentity>,
}

/// The devices refused at the handshake, and a way to cut the connections
/// a device has open when it is revoked.
#[derive(Debug, Default)]
pub struct DeviceGate {
    revoked: RwLock<HashSet<String>>,
    /// One token per device with open connections; each connection waits
    /// on a child of it.
    open: Mutex<HashMap<String, CancellationToken>>,
}

impl DeviceGate {
    /// A gate refusing these devices.
    pub fn new(revoked: impl IntoIterator<Item = String>) -> DeviceGate {
        DeviceGate {
            revoked: RwLock::new(revoked.into_iter().collect()),
            open: Mutex::default(),
        }
    }

    /// Refuses the device from now on and closes every connection it has
    /// open.
    pub fn revoke(&self, device_id: &str) {
        self.revoked
            .write()
            .expect("never poisoned: no panics while held")
            .insert(device_id.to_string());
        self.disconnect(device_id);
    }

    /// Closes every connection the device has open; it may connect again
    /// (if its certificate still passes the handshake).
    pub fn disconnect(&self, device_id: &str) {
        if let Some(token) = self
            .open
            .lock()
            .expect("never poisoned: no panics while held")
            .remove(device_id)
        {
            token.cancel();
        }
    }

    pub fn is_revoked_id(&self, device_id: &str) -> bool {
        self.revoked
            .read()
            .expect("never poisoned: no panics while held")
            .contains(device_id)
    }

    /// What a new connection of `device` waits on to be cut.
    fn token_for(&self, device: &str) -> CancellationToken {
        // One entry per device that has connected since start: bounded by
        // the fleet.
        let mut open = self
            .open
            .lock()
            .expect("never poisoned: no panics while held");
        open.entry(device.to_string()).or_default().child_token()
    }
}

impl Revocations for DeviceGate {
    fn is_revoked(&self, device: &DeviceIdentity) -> bool {
        self.is_revoked_id(&device.device_id)
    }
}

/// A connection a listener accepted: TLS (or plain TCP in development), with
/// who is at the other end.
pub struct Connection {
    io: Io,
    peer: Peer,
    /// Ready once the device is revoked: every read and write fails after.
    cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connection {
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    fn check_cut(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let cut = match &mut self.cut {
            Some(cut) => cut.as_mut().poll(cx).is_ready(),
            None => false,
        };
        if cut {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the device was revoked",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_cut(cx)?;
        match &mut self.io {
            Io::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_cut(cx)?;
        match &mut self.io {
            Io::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Incoming>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Incoming>) -> Peer {
        stream.io().peer.clone()
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

/// The connections one listener accepted, handshakes done.
pub struct Incoming {
    local: SocketAddr,
    connections: mpsc::Receiver<Connection>,
}

impl Incoming {
    /// Accepts on `listener`; with `tls`, each connection's handshake is
    /// completed first (and a device certificate's device remembered), else
    /// the connection is plain TCP (development only).
    pub fn start(
        listener: TcpListener,
        tls: Option<Acceptor>,
        gate: Arc<DeviceGate>,
    ) -> io::Result<Incoming> {
        let local = listener.local_addr()?;
        let (sender, connections) = mpsc::channel(64);
        tokio::spawn(accept_loop(listener, tls, gate, sender));
        Ok(Incoming { local, connections })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// For tonic's `serve_with_incoming`.
    pub fn into_stream(
        self,
    ) -> impl tokio_stream::Stream<Item = Result<Connection, io::Error>> + Send + 'static {
        tokio_stream::wrappers::ReceiverStream::new(self.connections).map(Ok)
    }
}

use tokio_stream::StreamExt as _;

impl axum::serve::Listener for Incoming {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Connection, SocketAddr) {
        match self.connections.recv().await {
            Some(connection) => {
                let address = connection.peer.address;
                (connection, address)
            }
            // The accept loop ended: the listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// What a plaintext client on a TLS port is told.
const PLAINTEXT_ON_TLS_PORT: &str =
    "this port serves TLS: connect with https:// and trust the fleet CA";

/// Answers a plaintext client in its own protocol, so that it can say why:
/// an HTTP/2 client (gRPC) gets a GOAWAY carrying the reason, an HTTP/1
/// client a 400.
/// Whether what an HTTP/2 client sent (its preface, then frames) holds a
/// HEADERS frame.
fn holds_headers(received: &[u8]) -> bool {
    const PREFACE: usize = 24;
    const HEADERS: u8 = 0x1;
    let mut at = PREFACE;
    while let Some(header) = received.get(at..at + 9) {
        if header[3] == HEADERS {
            return true;
        }
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        at += 9 + length;
    }
    false
}

async fn refuse_plaintext(mut socket: TcpStream, first: u8) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 4096];
    // Take what the client sent, so that closing does not reset the
    // connection before it reads the answer. An HTTP/2 client is answered
    // once its request is open (a HEADERS frame came): a GOAWAY before that
    // would only say "connection closed", without the reason.
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(n) = socket.read(&mut buf).await {
            received.extend_from_slice(&buf[..n]);
            if n == 0 || first != b'P' || holds_headers(&received) || received.len() > 65_536 {
                break;
            }
        }
    })
    .await;
    let answer = if first == b'P' {
        // The HTTP/2 preface: an empty SETTINGS frame, then GOAWAY
        // (PROTOCOL_ERROR) with the reason as debug data.
        let reason = PLAINTEXT_ON_TLS_PORT.as_bytes();
        let mut frames = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0];
        let length = (8 + reason.len()) as u32;
        frames.extend_from_slice(&length.to_be_bytes()[1..]);
        frames.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]);
        frames.extend_from_slice(&0u32.to_be_bytes());
        frames.extend_from_slice(&1u32.to_be_bytes());
        frames.extend_from_slice(reason);
        frames
    } else {
        format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{PLAINTEXT_ON_TLS_PORT}\n",
            PLAINTEXT_ON_TLS_PORT.len() + 1
        )
        .into_bytes()
    };
    let _ = socket.write_all(&answer).await;
    let _ = socket.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while socket.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    })
    .await;
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Acceptor>,
    gate: Arc<DeviceGate>,
    sender: mpsc::Sender<Connection>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (socket, address) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, mostly: wait rather than spin.
                tracing::warn!(%error, "Cannot accept a connection.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if sender.is_closed() {
            return;
        }
        let _ = socket.set_nodelay(true);
        let Some(acceptor) = tls.as_ref().map(|current| current.borrow().clone()) else {
            let peer = Peer {
                address,
                device: None,
            };
            let connection = Connection {
                io: Io::Plain(socket),
                peer,
                cut: None,
            };
            if sender.send(connection).await.is_err() {
                return;
            }
            continue;
        };
        let sender = sender.clone();
        let gate = gate.clone();
        let handshakes = handshakes.clone();
        tokio::spawn(async move {
            // Past MAX_HANDSHAKES a connection waits for a turn (a fleet
            // reconnecting at once after a restart), within the same time
            // limit: dropping it would cost the till a backoff.
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                let permit = handshakes
                    .acquire_owned()
                    .await
                    .map_err(|_| io::Error::other("the listener is closing"))?;
                let mut first = [0u8; 1];
                socket.peek(&mut first).await?;
                if first[0] != TLS_HANDSHAKE_RECORD {
                    refuse_plaintext(socket, first[0]).await;
                    return Err(io::Error::other("a plaintext client on the TLS port"));
                }
                let stream = acceptor.accept(socket).await;
                drop(permit);
                stream
            })
            .await;
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%address, %error, "TLS handshake failed.");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%address, "TLS handshake timed out.");
                    return;
                }
            };
            let device = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|der| DeviceIdentity::from_certificate(der).ok());
            let cut = device
                .as_ref()
                .map(|device| Box::pin(gate.token_for(&device.device_id).cancelled_owned()));
            let connection = Connection {
                io: Io::Tls(Box::new(stream)),
                peer: Peer { address, device },
                cut,
            };
            let _ = sender.send(connection).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use posfleet_pki::rustls::pki_types::{CertificateDer, ServerName};
    use posfleet_pki::{FleetCa, certificates_from_pem, private_key_from_pem};
    use std::time::SystemTime;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const DAY: Duration = Duration::from_secs(86_400);

    struct Setup {
        ca: FleetCa,
        gate: Arc<DeviceGate>,
        incoming: Incoming,
    }

    async fn setup() -> Setup {
        let (ca, _) = FleetCa::create("test CA", SystemTime::now()).unwrap();
        let issued = ca
            .issue_server(&["127.0.0.1".into()], DAY, SystemTime::now())
            .unwrap();
        let gate = Arc::new(DeviceGate::new(["dev-gone".to_string()]));
        let config = posfleet_pki::server_config(
            certificates_from_pem(issued.chain_pem.as_bytes(), "chain").unwrap(),
            private_key_from_pem(issued.key_pem.as_bytes(), "key").unwrap(),
            &certificates_from_pem(ca.certificates_pem().as_bytes(), "CA").unwrap(),
            gate.clone(),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let incoming = Incoming::start(
            listener,
            Some(tokio::sync::watch::channel(tokio_rustls::TlsAcceptor::from(Arc::new(config))).1),
            gate.clone(),
        )
        .unwrap();
        Setup { ca, gate, incoming }
    }

    async fn connect(
        setup: &Setup,
        device: Option<&str>,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let identity = device.map(|device| {
            let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
            let request = posfleet_pki::certificate_request(&key).unwrap();
            let issued = setup
                .ca
                .issue_device(
                    &request,
                    key.verifying_key().as_bytes(),
                    device,
                    "lyon-01",
                    DAY,
                    SystemTime::now(),
                )
                .unwrap();
            (
                vec![CertificateDer::from(issued.der)],
                posfleet_pki::private_key_der(&key).unwrap(),
            )
        });
        let trusted = certificates_from_pem(setup.ca.certificates_pem().as_bytes(), "CA").unwrap();
        let config = posfleet_pki::client_config(&trusted, identity).unwrap();
        let socket = TcpStream::connect(setup.incoming.local_addr()).await?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("127.0.0.1").unwrap(), socket)
            .await
    }

    #[tokio::test]
    async fn a_connection_knows_its_device_and_is_cut_when_the_device_is_revoked() {
        let mut setup = setup().await;
        let mut client = connect(&setup, Some("dev-1")).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let (mut server_side, _) = axum::serve::Listener::accept(&mut setup.incoming).await;
        let device = server_side.peer().device.clone().unwrap();
        assert_eq!(device.device_id, "dev-1");
        let mut buf = [0u8; 4];
        server_side.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        // The server waits for the next request; the revocation ends it.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 4];
            server_side.read_exact(&mut buf).await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        setup.gate.revoke("dev-1");
        let read = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the cut wakes the waiting read")
            .unwrap();
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::ConnectionReset);

        // And the device's next handshake is refused.
        let mut again = connect(&setup, Some("dev-1")).await.unwrap();
        let mut byte = [0u8; 1];
        let refused = again.read(&mut byte).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("CertificateRevoked")),
            "{refused:?}"
        );
    }

    #[test]
    fn an_http2_client_is_answered_once_its_request_headers_came() {
        let mut sent = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS with one setting (6 bytes), then WINDOW_UPDATE.
        sent.extend_from_slice(&[0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
        sent.extend_from_slice(&[0, 0, 4, 0x8, 0, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert!(!holds_headers(&sent));
        // HEADERS on stream 1, its block cut short.
        sent.extend_from_slice(&[0, 0, 20, 0x1, 0x4, 0, 0, 0, 1, 0x82]);
        assert!(holds_headers(&sent));
        assert!(!holds_headers(b"PRI * HTTP/2.0"));
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_has_no_device() {
        let mut setup = setup().await;
        let _client = connect(&setup, None).await.unwrap();
        let (server_side, _) = axum::serve::Listener::accept(&mut setup.incoming).await;
        assert!(server_side.peer().device.is_none());
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_handshake_does_not_block_others() {
        let mut setup = setup().await;
        // Opens a socket and says nothing.
        let _silent = TcpStream::connect(setup.incoming.local_addr())
            .await
            .unwrap();
        let _client = connect(&setup, Some("dev-2")).await.unwrap();
        let (server_side, _) = tokio::time::timeout(
            Duration::from_secs(5),
            axum::serve::Listener::accept(&mut setup.incoming),
        )
        .await
        .expect("the finished handshake is handed over");
        assert_eq!(
            server_side.peer().device.as_ref().unwrap().device_id,
            "dev-2"
        );
    }
}
