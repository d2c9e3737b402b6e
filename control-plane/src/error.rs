//! The control plane's errors, one variant per failing operation. Every
//! `Storage` method fails with this type; a gRPC handler passes it on with
//! `?`, and the client sees an internal error while the detail is logged.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot open the database {url}: {source}")]
    DatabaseOpen { url: String, source: sqlx::Error },
    #[error("cannot migrate the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "the database was migrated by a newer posfleet-control-plane (migration {applied}), \
         and its schema no longer works with binaries that know fewer than {oldest_compatible} \
         migrations; this one knows {known}: run a newer version"
    )]
    SchemaTooNew {
        applied: i64,
        known: i64,
        oldest_compatible: i64,
    },
    #[error("database query failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot create the data dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the first admin's setup code file {path}: {source}")]
    AdminSetupCodeFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("cannot read or store a bundle blob: {0}")]
    Blob(std::io::Error),
    #[error("bundle blobs: {0}")]
    BlobStore(#[from] crate::blobs::BlobError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("a concurrent change got there first: {0}")]
    Conflict(String),
    #[error("the rollout engine's lock is lost: {0}")]
    EngineLockLost(String),
    #[error("cannot build the webhook HTTP client: {0}")]
    WebhookClient(String),
    #[error("the bundle repository: {0}")]
    Repository(String),
    #[error(transparent)]
    OnlineKeys(#[from] crate::online_keys::KeyError),
    #[error("password hashing failed: {0}")]
    Password(String),
    #[error("TLS: {0}")]
    Tls(#[from] posfleet_pki::Error),
}

/// An error and its causes on one line, each cause that adds something
/// after a colon: a client library's top-level message ("Generic S3
/// error", "error sending request") rarely says what went wrong.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Storage errors become INTERNAL without leaking SQL to callers; the detail
/// goes to the log.
impl From<Error> for Status {
    fn from(error: Error) -> Status {
        tracing::error!(error = %error, "Request failed.");
        Status::new(Code::Internal, "internal error; see the control plane log")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_failures_reach_clients_as_internal_without_their_detail() {
        for error in [
            Error::Database(sqlx::Error::Protocol(
                "SELECT secret_sha256 FROM admin_tokens".into(),
            )),
            Error::Corrupt("installed bundles of dev-admin_tokens".into()),
            Error::Conflict("rollout ro-1 admin_tokens".into()),
        ] {
            let status = Status::from(error);
            assert_eq!(status.code(), Code::Internal);
            assert_eq!(
                status.message(),
                "internal error; see the control plane log"
            );
        }
    }
}
