//! Where bundle bytes come from. The install lifecycle asks a [`Fetcher`]
//! for a target and never cares whether the pieces came from the origin or
//! from a peer: every piece is checked against the signed chunk list before
//! it is written, so a source is never trusted.

use posfleet_bundle::chunks::ChunkList;
use posfleet_bundle::client::VerifiedTarget;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::repository::{RepoError, Timeouts, consistent_target_path};

/// Called with the number of verified bytes on disk as a download goes.
pub type Progress<'a> = &'a (dyn Fn(u64) + Send + Sync);

/// Verified bytes one fetch received, by source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    pub from_origin: u64,
    pub from_peers: u64,
}

/// One download: a signed target, its chunk list (checked against the
/// signed digest), the file to bring to the whole target, and whom to tell
/// how far it got.
#[derive(Clone, Copy)]
pub struct Download<'a> {
    pub target: &'a VerifiedTarget,
    pub list: &'a ChunkList,
    pub dest: &'a Path,
    pub progress: Progress<'a>,
}

#[async_trait::async_trait]
pub trait Fetcher: Send + Sync {
    /// The target's chunk list, checked against its signed digest.
    async fn chunk_list(&self, target: &VerifiedTarget) -> Result<ChunkList, RepoError>;

    /// Brings `dest` to the whole target: keeps the verified pieces already
    /// there, fetches the rest, verifies every piece before writing it.
    async fn fetch(&self, download: Download<'_>) -> Result<Received, RepoError>;
}

/// Length of the run of whole, verified pieces at the start of `file`.
/// Reads one piece at a time: memory stays at one chunk whatever the size.
pub(crate) fn verified_prefix(file: &mut std::fs::File, list: &ChunkList) -> std::io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut have = 0u64;
    let mut piece = Vec::with_capacity(list.chunk_size() as usize);
    for index in 0..list.count() {
        let Ok(want) = list.chunk_len(index) else {
            break;
        };
        piece.clear();
        let read = Read::by_ref(file).take(want).read_to_end(&mut piece)?;
        if read as u64 != want || list.verify_piece(index, &piece).is_err() {
            break;
        }
        have += want;
    }
    Ok(have)
}

/// Redirects are followed (a control plane with
/// `repo_redirect_to_object_store` sends blob requests to presigned URLs of
/// its object store; the bytes are verified against the signed chunk list
/// wherever they come from), at most `MAX_REDIRECTS` of them, never from
/// https to plain http. The target is reached with the same TLS settings:
/// on a TLS fleet it must present a certificate the till trusts.
fn redirect_policy() -> reqwest::redirect::Policy {
    const MAX_REDIRECTS: usize = 5;
    reqwest::redirect::Policy::custom(|attempt| {
        let downgrade = attempt
            .previous()
            .first()
            .is_some_and(|first| first.scheme() == "https")
            && attempt.url().scheme() != "https";
        if downgrade {
            attempt.error("refused a redirect from https to plain http")
        } else if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else {
            attempt.follow()
        }
    })
}

/// The control plane's `/repo/` over HTTP, with Range resumption. Clones
/// share one HTTP client, so a renewed certificate reaches them all.
#[derive(Clone)]
pub struct Origin {
    http: Arc<std::sync::RwLock<reqwest::Client>>,
    base_url: String,
    timeouts: Timeouts,
}

impl Origin {
    /// Over plaintext (an `http://` repository).
    pub fn new(base_url: &str, timeouts: Timeouts) -> Result<Origin, RepoError> {
        Origin::build(base_url, timeouts, None)
    }

    /// Over TLS with `tls` (for an `https://` repository: the trust and the
    /// device certificate the gRPC calls use).
    pub fn with_tls(
        base_url: &str,
        timeouts: Timeouts,
        tls: posfleet_pki::rustls::ClientConfig,
    ) -> Result<Origin, RepoError> {
        Origin::build(base_url, timeouts, Some(tls))
    }

    fn build(
        base_url: &str,
        timeouts: Timeouts,
        tls: Option<posfleet_pki::rustls::ClientConfig>,
    ) -> Result<Origin, RepoError> {
        let http = Origin::client(base_url, timeouts, tls)?;
        Ok(Origin {
            http: Arc::new(std::sync::RwLock::new(http)),
            base_url: base_url.trim_end_matches('/').to_string(),
            timeouts,
        })
    }

    /// From now on, every clone of this origin connects with `tls` (a
    /// renewed device certificate).
    pub fn use_tls(&self, tls: posfleet_pki::rustls::ClientConfig) -> Result<(), RepoError> {
        let http = Origin::client(&self.base_url, self.timeouts, Some(tls))?;
        *self
            .http
            .write()
            .expect("never poisoned: no panics while held") = http;
        Ok(())
    }

    fn http(&self) -> reqwest::Client {
        self.http
            .read()
            .expect("never poisoned: no panics while held")
            .clone()
    }

    fn client(
        base_url: &str,
        timeouts: Timeouts,
        tls: Option<posfleet_pki::rustls::ClientConfig>,
    ) -> Result<reqwest::Client, RepoError> {
        let builder = reqwest::Client::builder()
            .connect_timeout(timeouts.metadata)
            .read_timeout(timeouts.stall)
            .redirect(redirect_policy());
        let builder = match tls {
            Some(mut tls) => {
                tls.alpn_protocols = vec![b"http/1.1".to_vec()];
                builder.tls_backend_preconfigured(tls)
            }
            None => {
                // reqwest builds a TLS configuration even for a client that
                // never uses it, from the process's default provider: ours.
                posfleet_pki::install_crypto_provider();
                builder
            }
        };
        builder.build().map_err(|e| RepoError::Fetch {
            url: base_url.into(),
            message: e.to_string(),
        })
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base_url)
    }

    /// GETs `path` whole, refusing more than `limit` bytes or more than the
    /// metadata timeout. `Ok(None)` on 404.
    pub(crate) async fn get_whole(
        &self,
        path: &str,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, RepoError> {
        let url = self.url(path);
        let seconds = self.timeouts.metadata.as_secs();
        let fetch = async {
            // No answer, or a gateway with none: the store's peers may help.
            let fail = |e: reqwest::Error| RepoError::Unreachable {
                url: url.clone(),
                message: e.to_string(),
            };
            let mut response = self.http().get(&url).send().await.map_err(fail)?;
            if response.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if matches!(response.status().as_u16(), 502..=504) {
                return Err(RepoError::Unreachable {
                    url: url.clone(),
                    message: format!("HTTP {}", response.status()),
                });
            }
            if !response.status().is_success() {
                return Err(RepoError::Fetch {
                    url: url.clone(),
                    message: format!("HTTP {}", response.status()),
                });
            }
            if response.content_length().is_some_and(|n| n > limit) {
                return Err(RepoError::TooLarge {
                    url: url.clone(),
                    limit,
                });
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(fail)? {
                if (body.len() + chunk.len()) as u64 > limit {
                    return Err(RepoError::TooLarge {
                        url: url.clone(),
                        limit,
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Some(body))
        };
        tokio::time::timeout(self.timeouts.metadata, fetch)
            .await
            .unwrap_or(Err(RepoError::Timeout {
                url: url.clone(),
                seconds,
            }))
    }
}

#[async_trait::async_trait]
impl Fetcher for Origin {
    async fn chunk_list(&self, target: &VerifiedTarget) -> Result<ChunkList, RepoError> {
        let path = format!("chunks/{}", target.chunks_sha256_hex());
        let bytes = self
            .get_whole(&path, target.chunk_list_len())
            .await?
            .ok_or_else(|| RepoError::Fetch {
                url: self.url(&path),
                message: "not found".into(),
            })?;
        Ok(target.decode_chunk_list(&bytes)?)
    }

    async fn fetch(&self, download: Download<'_>) -> Result<Received, RepoError> {
        let Download { target, list, .. } = download;
        let (dest, progress) = (download.dest, download.progress);
        let write = |source| crate::error::Error::Write {
            path: dest.to_path_buf(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(dest)
            .map_err(write)?;
        let have = verified_prefix(&mut file, list).map_err(write)?;
        file.set_len(have).map_err(write)?;
        progress(have);
        if have == target.length() {
            return Ok(Received::default());
        }
        file.seek(SeekFrom::Start(have)).map_err(write)?;
        let first = (have / u64::from(list.chunk_size())) as usize;
        let mut written = have;
        let mut on_piece = |_index: usize, piece: Vec<u8>| -> Result<(), RepoError> {
            file.write_all(&piece).map_err(write)?;
            written += piece.len() as u64;
            progress(written);
            Ok(())
        };
        self.stream_pieces(target, list, first, list.count() - 1, &mut on_piece)
            .await?;
        file.sync_all().map_err(write)?;
        Ok(Received {
            from_origin: written - have,
            from_peers: 0,
        })
    }
}

impl Origin {
    /// Streams pieces `first..=last` of the target with one ranged GET,
    /// handing each to `on_piece` once it is whole and verified against the
    /// signed chunk list. Stalls, slow links and oversized answers end it
    /// with an error; the pieces handed over before that are good.
    pub(crate) async fn stream_pieces(
        &self,
        target: &VerifiedTarget,
        list: &ChunkList,
        first: usize,
        last: usize,
        on_piece: &mut (dyn FnMut(usize, Vec<u8>) -> Result<(), RepoError> + Send),
    ) -> Result<(), RepoError> {
        let size = u64::from(list.chunk_size());
        let start = list.offset(first);
        let end = list.offset(last) + list.chunk_len(last)?;
        let url = self.url(&format!(
            "targets/{}",
            consistent_target_path(target.name(), &target.sha256_hex())
        ));
        let fail = |e: reqwest::Error| {
            if e.is_timeout() {
                RepoError::Timeout {
                    url: url.clone(),
                    seconds: self.timeouts.stall.as_secs(),
                }
            } else {
                RepoError::Fetch {
                    url: url.clone(),
                    message: e.to_string(),
                }
            }
        };
        let whole = start == 0 && end == target.length();
        let mut request = self.http().get(&url);
        if !whole {
            let range = if end == target.length() {
                format!("bytes={start}-")
            } else {
                format!("bytes={start}-{}", end - 1)
            };
            request = request.header(reqwest::header::RANGE, range);
        }
        let mut response = request.send().await.map_err(fail)?;
        match response.status() {
            reqwest::StatusCode::PARTIAL_CONTENT if !whole => {}
            reqwest::StatusCode::OK if whole => {}
            // A gateway, or the control plane's object store, is down:
            // the store's peers may help, else a later try.
            status if matches!(status.as_u16(), 502..=504) => {
                return Err(RepoError::Unreachable {
                    url: url.clone(),
                    message: format!("HTTP {status}"),
                });
            }
            status => {
                return Err(RepoError::Fetch {
                    url: url.clone(),
                    message: format!("HTTP {status} for bytes {start}-{}", end - 1),
                });
            }
        }
        let wanted = end - start;
        let started = Instant::now();
        let mut received = 0u64;
        let mut index = first;
        let mut piece = Vec::with_capacity(size as usize);
        while let Some(chunk) = response.chunk().await.map_err(fail)? {
            received += chunk.len() as u64;
            if received > wanted {
                return Err(RepoError::TooLarge {
                    url: url.clone(),
                    limit: wanted,
                });
            }
            let elapsed = started.elapsed();
            if elapsed > self.timeouts.stall {
                let rate = (received as f64 / elapsed.as_secs_f64()) as u64;
                if rate < self.timeouts.min_bytes_per_second {
                    return Err(RepoError::TooSlow {
                        url: url.clone(),
                        rate,
                        minimum: self.timeouts.min_bytes_per_second,
                    });
                }
            }
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let want = list.chunk_len(index)? as usize - piece.len();
                let take = want.min(rest.len());
                piece.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if piece.len() as u64 == list.chunk_len(index)? {
                    // Verified before anyone gets it.
                    list.verify_piece(index, &piece)?;
                    let whole_piece =
                        std::mem::replace(&mut piece, Vec::with_capacity(size as usize));
                    on_piece(index, whole_piece)?;
                    index += 1;
                }
            }
        }
        if received != wanted {
            return Err(posfleet_bundle::Error::LengthMismatch {
                what: target.name().to_string(),
                expected: wanted,
                actual: received,
            }
            .into());
        }
        Ok(())
    }
}
