//! PostgreSQL's client tools: `pg_dump` of an exported snapshot, and the
//! database password handed to them in the environment.

use std::path::{Path, PathBuf};

use super::create::{Snapshot, blob_list};
use super::files::create_private;
use super::*;
use crate::config::PostgresTools;

impl PostgresTools {
    fn path(&self, tool: &str) -> PathBuf {
        match &self.pg_bin_dir {
            Some(dir) => dir.join(tool),
            None => PathBuf::from(tool),
        }
    }

    /// Runs `tool` with `args`, the database password (if the URL has
    /// one) in `PGPASSWORD` rather than on the command line.
    pub(super) async fn run(
        &self,
        tool: &'static str,
        args: &[std::ffi::OsString],
        password: Option<&str>,
    ) -> Result<String, BackupError> {
        let path = self.path(tool);
        let mut command = tokio::process::Command::new(&path);
        command.args(args).stdin(std::process::Stdio::null());
        if let Some(password) = password {
            command.env("PGPASSWORD", password);
        }
        let output = match command.output().await {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BackupError::ToolMissing { tool, path });
            }
            Err(source) => return Err(BackupError::Io { path, source }),
        };
        if !output.status.success() {
            return Err(BackupError::ToolFailed {
                tool,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// The URL without its password, and the password (percent-decoded): the
/// PostgreSQL tools get it in `PGPASSWORD`, not on a command line anyone
/// can read with `ps`.
pub(super) fn split_password(url: &str) -> (String, Option<String>) {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut password = None;
    let mut base = base.to_string();
    if let (Some(scheme_end), Some(at)) = (base.find("://"), base.rfind('@'))
        && at > scheme_end
        && let Some(colon) = base[scheme_end + 3..at].find(':')
    {
        let colon = scheme_end + 3 + colon;
        password = Some(percent_decode(&base[colon + 1..at]));
        base.replace_range(colon..at, "");
    }
    let query: Vec<&str> = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|pair| match pair.split_once('=') {
            Some((key, value)) if key.eq_ignore_ascii_case("password") => {
                password = Some(percent_decode(value));
                false
            }
            _ => !pair.is_empty(),
        })
        .collect();
    if !query.is_empty() {
        base.push('?');
        base.push_str(&query.join("&"));
    }
    (base, password)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `pg_dump --format=custom` of the PostgreSQL database at `url` to
/// `dest`, of the snapshot the schema version, rows and blobs are read in.
pub(super) async fn backup_postgres(
    url: &str,
    dest: &Path,
    tools: &PostgresTools,
) -> Result<Snapshot, BackupError> {
    let mut conn = connect(url).await?;
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut conn)
        .await
        .map_err(db_error(url))?;
    let snapshot_id: String = sqlx::query("SELECT pg_export_snapshot() AS id")
        .fetch_one(&mut conn)
        .await
        .and_then(|row| row.try_get("id"))
        .map_err(db_error(url))?;
    let snapshot = Snapshot {
        schema_version: schema_version(&mut conn, url).await?,
        rows: count_rows(&mut conn, url).await?,
        blobs: blob_list(&mut conn, url).await?,
    };
    // pg_dump truncates the file it is given: made first, so it is private.
    drop(create_private(dest)?);
    let (dbname, password) = split_password(url);
    let args: Vec<std::ffi::OsString> = vec![
        "--format=custom".into(),
        format!("--snapshot={snapshot_id}").into(),
        "--no-owner".into(),
        "--no-privileges".into(),
        {
            let mut file = std::ffi::OsString::from("--file=");
            file.push(dest);
            file
        },
        format!("--dbname={dbname}").into(),
    ];
    // The snapshot lives as long as the transaction that exported it.
    let dumped = tools.run("pg_dump", &args, password.as_deref()).await;
    let _ = sqlx::raw_sql("ROLLBACK").execute(&mut conn).await;
    let _ = conn.close().await;
    dumped?;
    // The archive reads back whole.
    tools
        .run("pg_restore", &["--list".into(), dest.into()], None)
        .await?;
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_leave_the_url_for_the_environment() {
        for (url, base, password) in [
            ("postgres://u@db/x", "postgres://u@db/x", None),
            (
                "postgres://u:s%40cret@db:5432/x",
                "postgres://u@db:5432/x",
                Some("s@cret"),
            ),
            (
                "postgres://db/x?user=u&password=pw&sslmode=require",
                "postgres://db/x?user=u&sslmode=require",
                Some("pw"),
            ),
            (
                "postgres://u:p@db/x?password=q",
                "postgres://u@db/x",
                Some("q"),
            ),
        ] {
            assert_eq!(
                split_password(url),
                (base.to_string(), password.map(str::to_string)),
                "{url}"
            );
        }
    }
}
