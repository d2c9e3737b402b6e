//! Bundle bytes and chunk lists, stored by their SHA-256 through the
//! `object_store` crate: under `<data_dir>/blobs` by default, or in an
//! S3-compatible bucket (`blob_store_url = "s3://bucket/prefix"`).
//!
//! A blob's key is `sha256/<first two hex digits>/<hash>` (after the
//! prefix), so the same bytes are stored once and a key never changes
//! meaning: a CDN or caching proxy may keep a blob forever. An upload is
//! spooled to a local file, verified by the caller, and only then put
//! under its key in one atomic step (a rename on local disk; one PUT, or a
//! multipart upload that is completed only once every part is in, on S3):
//! a failed put leaves nothing under the key.

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::signer::Signer;
use object_store::{
    ClientOptions, GetOptions, GetRange, GetResultPayload, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig, WriteMultipart,
};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// A spooled file untouched this long is an upload a crash cut off. A
/// younger one may be an upload in progress on another replica, when the
/// replicas share the blobs folder (a network filesystem), so it is left.
const ABANDONED_UPLOAD_AGE: Duration = Duration::from_secs(3600);

use crate::config::Config;
use crate::error::error_chain;

/// Uploads this large or larger go to an object store in parts this big.
const PART_BYTES: usize = 8 * 1024 * 1024;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;
/// Bytes read from a local blob at a time when serving it.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// How long the control plane waits for an object store to accept a
/// connection before that attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest silence on an object store connection (a stalled transfer).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Retries of a failed object store request (connection refused, 5xx),
/// and how long they may take in all: an operator publishing or a till
/// downloading learns that the store is down within seconds.
const RETRIES: usize = 3;
const RETRY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where blobs live, from `blob_store_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `<data_dir>/blobs` (an empty `blob_store_url`).
    DataDir,
    /// An S3-compatible bucket, keys under `prefix` (`""` or ending in `/`).
    S3 { bucket: String, prefix: String },
}

impl Location {
    /// Parses `blob_store_url`; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<Location, String> {
        if url.is_empty() {
            return Ok(Location::DataDir);
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(match url.split_once("://") {
                Some((scheme, _)) => format!(
                    "`{url}`: the scheme `{scheme}` is not supported; use s3://bucket/prefix \
                     (any S3-compatible store), or leave it empty to keep blobs in the data dir"
                ),
                None => format!(
                    "`{url}` is not a URL like s3://bucket/prefix; leave it empty to keep blobs \
                     in the data dir"
                ),
            });
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("`{url}` names no bucket: use s3://bucket/prefix"));
        }
        let bucket_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
        let edge =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !(3..=63).contains(&bucket.len())
            || !bucket.chars().all(bucket_char)
            || !edge(bucket.chars().next())
            || !edge(bucket.chars().last())
        {
            return Err(format!(
                "`{bucket}` is not an S3 bucket name (3 to 63 lowercase letters, digits, dots \
                 and hyphens, starting and ending with a letter or digit)"
            ));
        }
        let prefix = prefix.trim_end_matches('/');
        let mut key_prefix = String::new();
        for part in prefix.split('/').filter(|_| !prefix.is_empty()) {
            let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
            if part.is_empty() || part == "." || part == ".." || !part.chars().all(plain) {
                return Err(format!(
                    "`{url}`: the prefix `{prefix}` must be folder names of letters, digits, \
                     `-`, `_` and `.`, separated by single `/`"
                ));
            }
            key_prefix.push_str(part);
            key_prefix.push('/');
        }
        Ok(Location::S3 {
            bucket: bucket.into(),
            prefix: key_prefix,
        })
    }
}

/// Why a blob could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The object store did not answer, or answered with a server error:
    /// worth retrying later.
    #[error("the object store {store} is unavailable: {message}")]
    Unavailable { store: String, message: String },
    /// The object store answered, and refused (credentials, permissions,
    /// a missing bucket): retrying will not help until it is configured.
    #[error("the object store {store} refused the request: {message}")]
    Refused { store: String, message: String },
    /// The local disk: the spool of uploads, or the data dir's blobs.
    #[error("blob storage on local disk ({path}): {source}")]
    Disk {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl BlobError {
    /// A till or an operator may simply try again later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, BlobError::Unavailable { .. })
    }
}

/// A blob as found by [`BlobStore::head`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    pub size: u64,
}

/// Whether [`BlobStore::commit`] stored new bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The blob was not there before.
    New,
    /// The same bytes were already stored (another bundle shares them).
    AlreadyStored,
}

/// A blob's bytes (or a range of them), as they arrive.
pub type BlobStream = BoxStream<'static, std::io::Result<Bytes>>;

/// The blob store: an `object_store` backend, the folder uploads are
/// spooled to, and what is needed to describe it in messages.
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// Set for S3: signs the short-lived URLs `/repo/` may redirect to.
    signer: Option<Arc<AmazonS3>>,
    /// Prepended to every key (`""` or ending in `/`).
    prefix: String,
    /// Uploads in progress (`<data_dir>/blobs/tmp`); on local disk, inside
    /// the store, so a commit is a rename.
    spool: PathBuf,
    /// The data dir's blob folder, when blobs are kept there.
    local_root: Option<PathBuf>,
    /// `s3://bucket/prefix` or the local folder, for messages.
    name: String,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("name", &self.name)
            .finish()
    }
}

pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Makes the spool folder and empties it of uploads a crash interrupted
/// (see [`ABANDONED_UPLOAD_AGE`]).
fn open_spool(spool: &Path) -> Result<(), BlobError> {
    let disk = |source| BlobError::Disk {
        path: spool.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(spool).map_err(disk)?;
    for entry in std::fs::read_dir(spool).map_err(disk)? {
        let entry = entry.map_err(disk)?;
        let abandoned = match entry.metadata().and_then(|m| m.modified()) {
            Ok(modified) => modified
                .elapsed()
                .is_ok_and(|age| age >= ABANDONED_UPLOAD_AGE),
            Err(_) => true,
        };
        if abandoned {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

impl BlobStore {
    /// The store `config` names: the data dir's `blobs` folder, or an S3
    /// bucket. Nothing is asked of an object store yet: see
    /// [`BlobStore::check`].
    pub fn open(config: &Config) -> Result<BlobStore, BlobError> {
        let root = config.data_dir.join("blobs");
        match Location::parse(&config.blob_store_url) {
            Ok(Location::DataDir) => BlobStore::open_local(&root),
            Ok(Location::S3 { bucket, prefix }) => {
                BlobStore::open_s3(config, &bucket, &prefix, &root.join("tmp"))
            }
            Err(message) => Err(BlobError::Refused {
                store: config.blob_store_url.clone(),
                message,
            }),
        }
    }

    /// Blobs under `<root>/sha256/<first two hex digits>/<hash>`.
    pub fn open_local(root: &Path) -> Result<BlobStore, BlobError> {
        let disk = |source| BlobError::Disk {
            path: root.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(root.join("sha256")).map_err(disk)?;
        let spool = root.join("tmp");
        open_spool(&spool)?;
        let store = LocalFileSystem::new_with_prefix(root)
            .map_err(|e| disk(std::io::Error::other(e)))?
            .with_fsync(true);
        Ok(BlobStore {
            store: Arc::new(store),
            signer: None,
            prefix: String::new(),
            spool,
            local_root: Some(root.to_path_buf()),
            name: root.display().to_string(),
        })
    }

    fn open_s3(
        config: &Config,
        bucket: &str,
        prefix: &str,
        spool: &Path,
    ) -> Result<BlobStore, BlobError> {
        let name = format!("s3://{bucket}/{prefix}");
        let options = ClientOptions::new()
            .with_allow_http(config.blob_store_allow_http)
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_read_timeout(READ_TIMEOUT)
            // A till on a slow link may take many minutes over a bundle
            // streamed through the control plane.
            .with_timeout_disabled();
        let retry = RetryConfig {
            max_retries: RETRIES,
            retry_timeout: RETRY_TIMEOUT,
            ..RetryConfig::default()
        };
        // AWS_* variables first; the settings given in the config win.
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_client_options(options)
            .with_retry(retry);
        for (value, set) in [
            (
                &config.blob_store_endpoint,
                AmazonS3Builder::with_endpoint as fn(AmazonS3Builder, String) -> AmazonS3Builder,
            ),
            (&config.blob_store_region, AmazonS3Builder::with_region),
            (
                &config.blob_store_access_key_id,
                AmazonS3Builder::with_access_key_id,
            ),
            (
                &config.blob_store_secret_access_key.0,
                AmazonS3Builder::with_secret_access_key,
            ),
        ] {
            if !value.is_empty() {
                builder = set(builder, value.clone());
            }
        }
        let s3 = Arc::new(builder.build().map_err(|e| BlobError::Refused {
            store: name.clone(),
            message: e.to_string(),
        })?);
        open_spool(spool)?;
        Ok(BlobStore {
            store: s3.clone(),
            signer: Some(s3),
            prefix: prefix.into(),
            spool: spool.to_path_buf(),
            local_root: None,
            name,
        })
    }

    /// `s3://bucket/prefix`, or the local folder.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The data dir's blob folder, when blobs are kept there (a backup
    /// copies them; an object store keeps its own).
    pub fn local_root(&self) -> Option<&Path> {
        self.local_root.as_deref()
    }

    /// Whether `/repo/` can redirect to a presigned URL of this store.
    pub fn can_presign(&self) -> bool {
        self.signer.is_some()
    }

    /// A fresh local file for an upload in progress.
    pub fn temp_path(&self) -> PathBuf {
        self.spool.join(crate::secret::short_id("upload-", 12))
    }

    fn key(&self, sha256: &str) -> Key {
        Key::from(format!("{}sha256/{}/{sha256}", self.prefix, &sha256[..2]))
    }

    fn error(&self, error: object_store::Error) -> BlobError {
        use object_store::Error as E;
        let refused = |message| BlobError::Refused {
            store: self.name.clone(),
            message,
        };
        match error {
            E::PermissionDenied { .. } | E::Unauthenticated { .. } | E::NotFound { .. } => {
                refused(error_chain(&error))
            }
            error if self.local_root.is_some() => BlobError::Disk {
                path: PathBuf::from(&self.name),
                source: std::io::Error::other(error_chain(&error)),
            },
            error => {
                let message = error_chain(&error);
                match s3_error_code(&message) {
                    Some("NoSuchBucket") => {
                        refused(format!("the bucket does not exist ({message})"))
                    }
                    Some(code) if S3_REFUSALS.contains(&code) => refused(message),
                    _ => BlobError::Unavailable {
                        store: self.name.clone(),
                        message,
                    },
                }
            }
        }
    }

    /// Asks the store whether it answers and lets this control plane in:
    /// at start, so a misconfigured or unreachable store is named at once
    /// rather than at the first publish.
    pub async fn check(&self) -> Result<(), BlobError> {
        let prefix = Key::from(format!("{}sha256", self.prefix));
        self.store
            .list_with_delimiter(Some(&prefix))
            .await
            .map(|_| ())
            .map_err(|e| self.error(e))
    }

    /// The blob's size, or `None` if it is not stored.
    pub async fn head(&self, sha256: &str) -> Result<Option<BlobInfo>, BlobError> {
        if !is_sha256_hex(sha256) {
            return Ok(None);
        }
        match self.store.head(&self.key(sha256)).await {
            Ok(meta) => Ok(Some(BlobInfo { size: meta.size })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Puts a fully written, verified file in as the blob `sha256`, and
    /// removes the file. Atomic: a failure leaves no blob under the key.
    pub async fn commit(&self, temp: &Path, sha256: &str) -> Result<Committed, BlobError> {
        let disk = |source| BlobError::Disk {
            path: temp.to_path_buf(),
            source,
        };
        if !is_sha256_hex(sha256) {
            return Err(disk(std::io::Error::other(format!(
                "`{sha256}` is not a SHA-256"
            ))));
        }
        let key = self.key(sha256);
        let stored = match self.head(sha256).await? {
            Some(_) => Committed::AlreadyStored,
            None => Committed::New,
        };
        if self.local_root.is_some() {
            // The spool is inside the store: the file becomes the blob by
            // a rename, after its bytes are on disk.
            let file = tokio::fs::File::open(temp).await.map_err(disk)?;
            file.sync_all().await.map_err(disk)?;
            let spooled = temp
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| disk(std::io::Error::other("not a spool file")))?;
            self.store
                .rename(&Key::from(format!("tmp/{spooled}")), &key)
                .await
                .map_err(|e| self.error(e))?;
            return Ok(stored);
        }
        if stored == Committed::New {
            self.upload(temp, &key).await?;
        }
        tokio::fs::remove_file(temp).await.map_err(disk)?;
        Ok(stored)
    }

    /// Puts the file `temp` at `key`: in one request when small, else in
    /// parts, the upload completed only once every part is in and aborted
    /// on any failure.
    async fn upload(&self, temp: &Path, key: &Key) -> Result<(), BlobError> {
        let disk = |source| BlobError::Disk {
            path: temp.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::open(temp).await.map_err(disk)?;
        let size = file.metadata().await.map_err(disk)?.len();
        if size < PART_BYTES as u64 {
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes).await.map_err(disk)?;
            self.store
                .put(key, PutPayload::from(bytes))
                .await
                .map_err(|e| self.error(e))?;
            return Ok(());
        }
        let upload = self
            .store
            .put_multipart(key)
            .await
            .map_err(|e| self.error(e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buffer = vec![0u8; PART_BYTES];
        let written: Result<(), BlobError> = async {
            loop {
                let read = file.read(&mut buffer).await.map_err(disk)?;
                if read == 0 {
                    return Ok(());
                }
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| self.error(e))?;
                writer.write(&buffer[..read]);
            }
        }
        .await;
        match written {
            Ok(()) => {
                writer.finish().await.map_err(|e| self.error(e))?;
                Ok(())
            }
            Err(error) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(
                        store = %self.name,
                        error = %abort,
                        "Cannot abort a failed multipart upload; the store's lifecycle rules \
                         remove its parts."
                    );
                }
                Err(error)
            }
        }
    }

    /// Removes the blob `sha256` (one a failed publish put and nothing
    /// names).
    pub async fn discard(&self, sha256: &str) -> Result<(), BlobError> {
        if !is_sha256_hex(sha256) {
            return Ok(());
        }
        match self.store.delete(&self.key(sha256)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Bytes `range` of the blob `sha256` (a range [`BlobStore::head`]
    /// checked against its size), streamed.
    pub async fn read(&self, sha256: &str, range: Range<u64>) -> Result<BlobStream, BlobError> {
        let options = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            ..GetOptions::default()
        };
        let result = self
            .store
            .get_opts(&self.key(sha256), options)
            .await
            .map_err(|e| self.error(e))?;
        match result.payload {
            // Read in large pieces, not object_store's 8 KiB ones.
            GetResultPayload::File(file, path) => {
                let mut file = tokio::fs::File::from_std(file);
                file.seek(std::io::SeekFrom::Start(range.start))
                    .await
                    .map_err(|source| BlobError::Disk { path, source })?;
                let limited = file.take(range.end - range.start);
                Ok(tokio_util::io::ReaderStream::with_capacity(limited, READ_BUFFER_BYTES).boxed())
            }
            GetResultPayload::Stream(stream) => {
                let name = self.name.clone();
                Ok(stream
                    .map_err(move |e| {
                        std::io::Error::other(format!(
                            "the object store {name} failed mid-transfer: {}",
                            error_chain(&e)
                        ))
                    })
                    .boxed())
            }
        }
    }

    /// A URL of the blob that anyone holding it may GET for `expires_in`,
    /// signed with the store's credentials; `None` for a local store.
    pub async fn presigned_url(
        &self,
        sha256: &str,
        expires_in: Duration,
    ) -> Result<Option<String>, BlobError> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let url = signer
            .signed_url(axum::http::Method::GET, &self.key(sha256), expires_in)
            .await
            .map_err(|e| self.error(e))?;
        Ok(Some(url.to_string()))
    }
}

/// S3 error codes that retrying will not cure: the bucket, the
/// credentials or the permissions are wrong.
const S3_REFUSALS: &[&str] = &[
    "NoSuchBucket",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "InvalidBucketName",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
];

/// The `<Code>` of an S3 error answer quoted in an error message
/// (object_store keeps the answer's body in its message, not its type).
fn s3_error_code(message: &str) -> Option<&str> {
    let start = message.find("<Code>")? + "<Code>".len();
    let len = message[start..].find("</Code>")?;
    Some(&message[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_store_urls() {
        let s3 = |bucket: &str, prefix: &str| {
            Ok(Location::S3 {
                bucket: bucket.into(),
                prefix: prefix.into(),
            })
        };
        let cases: &[(&str, Result<Location, &str>)] = &[
            ("", Ok(Location::DataDir)),
            ("s3://posfleet-blobs", s3("posfleet-blobs", "")),
            ("s3://posfleet-blobs/", s3("posfleet-blobs", "")),
            (
                "s3://blobs.example/eu/prod",
                s3("blobs.example", "eu/prod/"),
            ),
            ("s3://blobs/eu/prod/", s3("blobs", "eu/prod/")),
            ("gs://blobs/x", Err("the scheme `gs` is not supported")),
            (
                "file:///srv/blobs",
                Err("the scheme `file` is not supported"),
            ),
            ("/srv/blobs", Err("is not a URL like s3://bucket/prefix")),
            ("s3://", Err("names no bucket")),
            ("s3:///prefix", Err("names no bucket")),
            ("s3://Blobs", Err("is not an S3 bucket name")),
            ("s3://ab", Err("is not an S3 bucket name")),
            ("s3://-blobs", Err("is not an S3 bucket name")),
            ("s3://blobs/a//b", Err("must be folder names")),
            ("s3://blobs/a/../b", Err("must be folder names")),
            ("s3://blobs/a?b", Err("must be folder names")),
        ];
        for (url, expected) in cases {
            match (Location::parse(url), expected) {
                (Ok(got), Ok(want)) => assert_eq!(&got, want, "{url}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{url}: {got}"),
                (got, want) => panic!("{url}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn s3_error_codes_are_read_from_messages() {
        let answer = "Server returned non-2xx status code: 404 Not Found: <?xml \
                      version=\"1.0\"?> <Error><Code>NoSuchBucket</Code><Message>The \
                      specified bucket does not exist</Message></Error>";
        assert_eq!(s3_error_code(answer), Some("NoSuchBucket"));
        assert_eq!(s3_error_code("Connection refused (os error 111)"), None);
        assert_eq!(s3_error_code("<Code>unterminated"), None);
    }

    #[tokio::test]
    async fn local_blobs_keep_the_data_dir_layout_and_commit_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("blobs");
        let store = BlobStore::open_local(&root).unwrap();
        let bytes = b"posfleet".repeat(1000);
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        assert_eq!(store.head(&sha256).await.unwrap(), None);

        let temp = store.temp_path();
        std::fs::write(&temp, &bytes).unwrap();
        assert_eq!(store.commit(&temp, &sha256).await.unwrap(), Committed::New);
        assert!(!temp.exists());
        let path = root.join("sha256").join(&sha256[..2]).join(&sha256);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert_eq!(
            store.head(&sha256).await.unwrap(),
            Some(BlobInfo { size: 8000 })
        );
        let part: Vec<u8> = store
            .read(&sha256, 8..24)
            .await
            .unwrap()
            .try_collect::<Vec<Bytes>>()
            .await
            .unwrap()
            .concat();
        assert_eq!(part, bytes[8..24]);

        let again = store.temp_path();
        std::fs::write(&again, &bytes).unwrap();
        assert_eq!(
            store.commit(&again, &sha256).await.unwrap(),
            Committed::AlreadyStored
        );
        assert!(
            store
                .commit(&store.temp_path(), "not-a-hash")
                .await
                .is_err()
        );
        store.discard(&sha256).await.unwrap();
        assert_eq!(store.head(&sha256).await.unwrap(), None);
        assert_eq!(
            store
                .presigned_url(&sha256, Duration::from_secs(60))
                .await
                .unwrap(),
            None
        );
    }

    /// Another replica starting on the shared blobs folder leaves an
    /// upload in progress alone; an upload a crash cut off long ago goes.
    #[tokio::test]
    async fn a_replica_starting_on_a_shared_folder_keeps_uploads_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let serving = BlobStore::open_local(dir.path()).unwrap();
        let in_progress = serving.temp_path();
        std::fs::write(&in_progress, b"bundle bytes").unwrap();
        let abandoned = serving.temp_path();
        std::fs::write(&abandoned, b"cut off").unwrap();
        let long_ago = std::time::SystemTime::now() - ABANDONED_UPLOAD_AGE * 2;
        std::fs::File::options()
            .write(true)
            .open(&abandoned)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();

        let _starting = BlobStore::open_local(dir.path()).unwrap();
        assert!(!abandoned.exists(), "an abandoned upload is removed");
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"bundle bytes"));
        assert_eq!(
            serving.commit(&in_progress, &sha256).await.unwrap(),
            Committed::New
        );
        let stored = dir.path().join("sha256").join(&sha256[..2]).join(&sha256);
        assert_eq!(std::fs::read(stored).unwrap(), b"bundle bytes");
    }
}
