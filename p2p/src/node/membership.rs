//! Who may connect: the store's member list, dialing members, mDNS finds
//! and bans.

use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, mdns};
use std::collections::HashMap;
use std::num::NonZeroU8;
use std::time::Instant;
use tracing::{debug, info, warn};

use super::Node;
use crate::Member;

impl Node {
    /// Connected peers on the member list, sorted.
    pub(super) fn connected_members(&self) -> Vec<PeerId> {
        let mut list: Vec<PeerId> = self
            .peers
            .keys()
            .filter(|p| self.allowed(p))
            .copied()
            .collect();
        list.sort();
        list
    }

    pub(super) fn set_members(&mut self, members: Vec<Member>) {
        let mut new: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for member in members {
            if member.peer_id != self.local_peer {
                new.entry(member.peer_id).or_default().extend(member.addrs);
            }
        }
        let removed: Vec<PeerId> = self
            .members
            .keys()
            .filter(|p| !new.contains_key(p))
            .copied()
            .collect();
        for peer in removed {
            info!(peer_id = %peer, "Peer left the store's membership: disconnecting.");
            // Closes its connections and refuses new ones.
            self.swarm.behaviour_mut().members.disallow_peer(peer);
            self.peers.remove(&peer);
            self.discovered.remove(&peer);
        }
        for (peer, addrs) in &new {
            if self.swarm.behaviour_mut().members.allow_peer(*peer) {
                debug!(peer_id = %peer, "Peer joined the store's membership.");
            }
            for addr in addrs {
                self.swarm.add_peer_address(*peer, addr.clone());
            }
        }
        self.members = new;
        self.redial();
    }

    pub(super) fn redial(&mut self) {
        self.last_redial = Instant::now();
        let targets: Vec<(PeerId, Vec<Multiaddr>)> = self
            .members
            .iter()
            .filter(|(p, _)| !self.banned.contains(p) && !self.swarm.is_connected(p))
            .map(|(p, addrs)| {
                let mut all = addrs.clone();
                if let Some(found) = self.discovered.get(p) {
                    all.extend(found.iter().cloned());
                }
                // TCP first, one address at a time: on a LAN, noise over TCP
                // costs much less CPU per byte than QUIC; QUIC is the fallback.
                all.sort_by_key(|a| !a.iter().any(|p| matches!(p, Protocol::Tcp(_))));
                (*p, all)
            })
            .filter(|(_, addrs)| !addrs.is_empty())
            .collect();
        for (peer, addrs) in targets {
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .override_dial_concurrency_factor(NonZeroU8::MIN)
                .build();
            if let Err(error) = self.swarm.dial(opts) {
                debug!(peer_id = %peer, %error, "Cannot dial a member.");
            }
        }
    }

    pub(super) fn mdns_event(&mut self, event: mdns::Event) {
        match event {
            mdns::Event::Discovered(found) => {
                for (peer, addr) in found {
                    if self.members.contains_key(&peer) {
                        debug!(peer_id = %peer, address = %addr, "Member found by mDNS.");
                        self.swarm.add_peer_address(peer, addr.clone());
                        self.discovered.entry(peer).or_default().insert(addr);
                    }
                }
                self.redial();
            }
            mdns::Event::Expired(gone) => {
                for (peer, addr) in gone {
                    if let Some(set) = self.discovered.get_mut(&peer) {
                        set.remove(&addr);
                    }
                }
            }
        }
    }

    pub(super) fn ban(&mut self, peer: PeerId, reason: &'static str) {
        if !self.banned.insert(peer) {
            return;
        }
        warn!(peer_id = %peer, reason, "Banned a peer.");
        self.stats.banned_peers += 1;
        // Closes its connections and refuses new ones.
        self.swarm.behaviour_mut().banned.block_peer(peer);
        self.peers.remove(&peer);
        for local in self.bundles.values_mut() {
            if let Some(fetch) = &mut local.fetch {
                fetch.requested.retain(|_, p| *p != peer);
            }
        }
    }
}
