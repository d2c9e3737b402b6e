use libp2p::Multiaddr;
use std::time::Duration;

use crate::protocol::Limits;

/// How a till takes part in its store's bundle sharing.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to accept connections. Default: every interface, a free port,
    /// TCP and QUIC.
    pub listen_addrs: Vec<Multiaddr>,
    /// Also find the store's peers by mDNS on the local network.
    pub mdns: bool,
    /// Upload cap towards each peer (token bucket, one piece of burst);
    /// 0 means unlimited.
    pub upload_limit_bytes_per_second_per_peer: u64,
    /// Pieces in flight at once, in each direction.
    pub max_concurrent_transfers: usize,
    /// Established connections in total (and at most 2 per peer).
    pub max_connections: u32,
    /// With no connected store peer for this long, a fetch goes to the
    /// origin alone.
    pub origin_fallback_delay: Duration,
    /// The till fetching from the origin got no piece for this long: the
    /// next one in rendezvous order takes over.
    pub stall_timeout: Duration,
    /// A fetch decides who goes to the origin as soon as every connected
    /// member has answered the announcement of the fetch, or after this
    /// long if some have not (a member that slow is left out of the order).
    pub settle_delay: Duration,
    /// Least time between two status announcements (they are pushed on
    /// change, and refreshed every couple of seconds).
    pub announce_interval: Duration,
    /// How long a peer may take to answer one request.
    pub request_timeout: Duration,
    pub limits: Limits,
    /// Test hook: flip a byte in every piece and chunk list this till
    /// serves, and a signature digit in every TUF metadata file (sent whole,
    /// whatever the asker's limit), to exercise its peers' defences.
    /// Only with the `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub corrupt_served_data: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen_addrs: vec![
                "/ip4/0.0.0.0/tcp/0"
                    .parse()
                    .expect("a valid literal address"),
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .expect("a valid literal address"),
            ],
            mdns: true,
            upload_limit_bytes_per_second_per_peer: 0,
            max_concurrent_transfers: 16,
            max_connections: 64,
            origin_fallback_delay: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(10),
            settle_delay: Duration::from_secs(2),
            announce_interval: Duration::from_millis(50),
            request_timeout: Duration::from_secs(60),
            limits: Limits::default(),
            #[cfg(feature = "test-hooks")]
            corrupt_served_data: false,
        }
    }
}
