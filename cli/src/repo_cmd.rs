//! Keys and bundles: `posfleet keys init|rotate`, `posfleet bundle
//! build|delta|publish|list`. Root and targets keys stay with ops (root offline);
//! the control plane only ever sees signed metadata.

use anyhow::{Context, anyhow, bail};
use chrono::Utc;
use clap::{Subcommand, ValueEnum};
use ed25519_dalek::SigningKey;
use posfleet_bundle::tuf::{self, ROOT, TARGETS, Targets};
use posfleet_bundle::{archive, chunks, repo};
use posfleet_proto::v1;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Admin, Output};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create the root and targets keys in DIR and initialize the control
    /// plane's bundle repository with them.
    Init {
        dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        root_keys: u32,
        #[arg(long, default_value_t = 1)]
        root_threshold: u64,
        #[arg(long, default_value_t = 1)]
        targets_keys: u32,
        #[arg(long, default_value_t = 1)]
        targets_threshold: u64,
        /// Root lifetime, e.g. `365d`.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        root_expires_in: Duration,
        /// Targets metadata lifetime, e.g. `90d`.
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        targets_expires_in: Duration,
    },
    /// Replace the keys of a role with new ones and publish root N+1, signed
    /// by the old and the new root keys.
    Rotate {
        dir: PathBuf,
        #[arg(long, value_enum)]
        role: RotateRole,
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        root_expires_in: Duration,
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        targets_expires_in: Duration,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RotateRole {
    Root,
    Targets,
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Pack a directory with a posfleet-bundle.toml into a bundle file.
    Build {
        src: PathBuf,
        /// The bundle file to write.
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: PathBuf,
    },
    /// Make the delta that rebuilds bundle TO from the earlier version
    /// FROM, and say how much smaller it is than TO.
    Delta {
        from: PathBuf,
        to: PathBuf,
        /// The delta file to write.
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: PathBuf,
    },
    /// Sign a bundle with the targets keys in DIR and publish it, then a
    /// delta to it from earlier versions (tills holding one of those fetch
    /// the delta instead of the bundle): by default from the versions tills
    /// run (the most run first, at most three), fetched from the control
    /// plane; or from the bundle files given with --delta-from.
    Publish {
        file: PathBuf,
        #[arg(long)]
        keys: PathBuf,
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        targets_expires_in: Duration,
        /// Bundle files of earlier, published versions, comma-separated.
        /// With the bundle already published, only the deltas are.
        #[arg(
            long,
            value_delimiter = ',',
            value_name = "FILE",
            conflicts_with = "no_deltas"
        )]
        delta_from: Vec<PathBuf>,
        /// Publish the bundle alone, no delta.
        #[arg(long)]
        no_deltas: bool,
    },
    /// List published bundles.
    List {
        #[arg(long)]
        name: Option<String>,
    },
}

fn write_key(path: &Path, key: &SigningKey) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(format!("{}\n", hex::encode(key.to_bytes())).as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// The keys `<role>-<n>.key` in `dir`, in order.
fn read_keys(dir: &Path, role: &str) -> anyhow::Result<Vec<SigningKey>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the key directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{role}-")) && n.ends_with(".key"))
        })
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let seed: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| anyhow!("{} is not a hex Ed25519 key", path.display()))?;
            Ok(SigningKey::from_bytes(&seed))
        })
        .collect()
}

fn generate_keys(dir: &Path, role: &str, count: u32) -> anyhow::Result<Vec<SigningKey>> {
    (1..=count)
        .map(|n| {
            let key = repo::generate_key();
            write_key(&dir.join(format!("{role}-{n}.key")), &key)?;
            Ok(key)
        })
        .collect()
}

fn online_keys(
    repository: &v1::Repository,
) -> anyhow::Result<(ed25519_dalek::VerifyingKey, ed25519_dalek::VerifyingKey)> {
    let parse = |hex_key: &str| -> anyhow::Result<ed25519_dalek::VerifyingKey> {
        let bytes: [u8; 32] = hex::decode(hex_key)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow!("the control plane sent a malformed online key"))?;
        Ok(ed25519_dalek::VerifyingKey::from_bytes(&bytes)?)
    };
    Ok((
        parse(&repository.snapshot_public_key)?,
        parse(&repository.timestamp_public_key)?,
    ))
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::seconds(d.as_secs().min(100 * 365 * 86_400) as i64)
}

/// How many keys each offline role gets, and how many must sign.
#[derive(Debug, Clone, Copy)]
pub struct RoleKeyCounts {
    pub root_keys: u32,
    pub root_threshold: u64,
    pub targets_keys: u32,
    pub targets_threshold: u64,
}

/// Creates root and targets keys in `dir` (0600), signs root version 1
/// naming the control plane's online keys and an empty targets metadata, and
/// initializes the control plane's repository with them. Writes
/// `dir/root.json`, the root to pin on agents.
pub async fn init(
    admin: &mut Admin,
    dir: &Path,
    roles: RoleKeyCounts,
    root_expires_in: Duration,
    targets_expires_in: Duration,
) -> anyhow::Result<()> {
    if !(1..=u64::from(roles.root_keys)).contains(&roles.root_threshold)
        || !(1..=u64::from(roles.targets_keys)).contains(&roles.targets_threshold)
    {
        bail!("each threshold must be between 1 and the number of keys of its role");
    }
    let repository = admin.repository().await?;
    if !repository.root_json.is_empty() {
        bail!("the control plane's repository is already initialized; use `posfleet keys rotate`");
    }
    let (snapshot, timestamp) = online_keys(&repository)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    if !read_keys(dir, ROOT)?.is_empty() || !read_keys(dir, TARGETS)?.is_empty() {
        bail!(
            "{} already holds keys; choose an empty directory",
            dir.display()
        );
    }
    let root_signers = generate_keys(dir, ROOT, roles.root_keys)?;
    let targets_signers = generate_keys(dir, TARGETS, roles.targets_keys)?;
    let keys = repo::RootKeys {
        root: root_signers.iter().map(|k| k.verifying_key()).collect(),
        root_threshold: roles.root_threshold,
        targets: targets_signers.iter().map(|k| k.verifying_key()).collect(),
        targets_threshold: roles.targets_threshold,
        snapshot,
        timestamp,
    };
    let now = Utc::now();
    let root = repo::root(&keys, 1, now + chrono_duration(root_expires_in));
    let root_json = tuf::sign(&root, &root_signers.iter().collect::<Vec<_>>());
    let targets = repo::targets(
        1,
        now + chrono_duration(targets_expires_in),
        Default::default(),
    );
    let targets_json = tuf::sign(&targets, &targets_signers.iter().collect::<Vec<_>>());
    admin
        .init_repository(root_json.clone(), targets_json)
        .await?;
    std::fs::write(dir.join("root.json"), &root_json)?;
    Ok(())
}

pub async fn keys(admin: &mut Admin, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Init {
            dir,
            root_keys,
            root_threshold,
            targets_keys,
            targets_threshold,
            root_expires_in,
            targets_expires_in,
        } => {
            let roles = RoleKeyCounts {
                root_keys,
                root_threshold,
                targets_keys,
                targets_threshold,
            };
            init(admin, &dir, roles, root_expires_in, targets_expires_in).await?;
            println!(
                "Repository initialized with root version 1 ({root_keys} root keys, threshold {root_threshold}; \
                 {targets_keys} targets keys, threshold {targets_threshold})."
            );
            println!(
                "Pin {} on every agent (root_json_path).",
                dir.join("root.json").display()
            );
            println!(
                "Move {}/root-*.key offline now; they are needed only to rotate keys.",
                dir.display()
            );
        }
        KeysCommand::Rotate {
            dir,
            role,
            root_expires_in,
            targets_expires_in,
        } => {
            let repository = admin.repository().await?;
            if repository.root_json.is_empty() {
                bail!("the repository is not initialized; run `posfleet keys init`");
            }
            let current: tuf::Root =
                tuf::parse_envelope(ROOT, &repository.root_json, u64::MAX)?.decode(ROOT)?;
            let old_root = read_keys(&dir, ROOT)?;
            let old_targets = read_keys(&dir, TARGETS)?;
            let (snapshot, timestamp) = online_keys(&repository)?;
            let rotated = match role {
                RotateRole::Root => ROOT,
                RotateRole::Targets => TARGETS,
            };
            let old = if rotated == ROOT {
                &old_root
            } else {
                &old_targets
            };
            if old.is_empty() {
                bail!(
                    "no {rotated}-*.key in {}: the current keys are needed to rotate",
                    dir.display()
                );
            }
            // New keys are written as pending-* first and take their place
            // only once the control plane accepted the new root.
            let fresh = generate_keys(&dir, &format!("pending-{rotated}"), old.len() as u32)?;
            let discard_pending = || {
                for n in 1..=old.len() {
                    let _ = std::fs::remove_file(dir.join(format!("pending-{rotated}-{n}.key")));
                }
            };
            let (root_signers, targets_signers) = match role {
                RotateRole::Root => (fresh.clone(), old_targets.clone()),
                RotateRole::Targets => (old_root.clone(), fresh.clone()),
            };
            let keys = repo::RootKeys {
                root: root_signers.iter().map(|k| k.verifying_key()).collect(),
                root_threshold: current.roles[ROOT].threshold,
                targets: targets_signers.iter().map(|k| k.verifying_key()).collect(),
                targets_threshold: current.roles[TARGETS].threshold,
                snapshot,
                timestamp,
            };
            let now = Utc::now();
            let root = repo::root(
                &keys,
                current.version + 1,
                now + chrono_duration(root_expires_in),
            );
            // Signed by the old root keys (trust carries over) and the new.
            let mut signers: Vec<&SigningKey> = old_root.iter().collect();
            if matches!(role, RotateRole::Root) {
                signers.extend(fresh.iter());
            }
            let root_json = tuf::sign(&root, &signers);
            if let Err(error) = admin.update_root(root_json.clone()).await {
                discard_pending();
                return Err(error);
            }
            let retired = dir.join(format!(
                "retired-{}-{rotated}",
                Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
            ));
            std::fs::DirBuilder::new().mode(0o700).create(&retired)?;
            for n in 1..=old.len() {
                let name = format!("{rotated}-{n}.key");
                std::fs::rename(dir.join(&name), retired.join(&name))?;
                std::fs::rename(dir.join(format!("pending-{name}")), dir.join(&name))?;
            }
            std::fs::write(dir.join("root.json"), &root_json)?;
            if matches!(role, RotateRole::Targets) {
                // The targets metadata must now carry the new keys' signatures.
                let targets: Targets =
                    tuf::parse_envelope(TARGETS, &repository.targets_json, u64::MAX)?
                        .decode(TARGETS)?;
                let resigned = repo::targets(
                    targets.version + 1,
                    now + chrono_duration(targets_expires_in),
                    targets.targets,
                );
                let targets_json = tuf::sign(&resigned, &fresh.iter().collect::<Vec<_>>());
                admin.publish(targets_json, None).await?;
            }
            println!(
                "Rotated the {rotated} keys: root version {} is published; the old keys are in {}.",
                current.version + 1,
                retired.display()
            );
        }
    }
    Ok(())
}

pub async fn bundle(
    admin: Option<&mut Admin>,
    command: BundleCommand,
    output: Output,
) -> anyhow::Result<()> {
    match command {
        BundleCommand::Build { src, out } => {
            let manifest = archive::build(&src, &out)?;
            let digest = chunks::digest_reader(std::fs::File::open(&out)?)?;
            println!(
                "Built {} ({} bytes, sha256 {}) into {}",
                manifest.target_name(),
                digest.length,
                hex::encode(digest.sha256),
                out.display()
            );
        }
        BundleCommand::Delta { from, to, out } => {
            let made = posfleet_bundle::delta::make_from_bundles(&from, &to, &out)?;
            println!(
                "Made the delta from {} to {}: {} bytes, {:.4} of the bundle's {} bytes, into {}",
                made.base.target_name(),
                made.result.target_name(),
                made.delta_bytes,
                made.delta_bytes as f64 / made.result_bundle_bytes.max(1) as f64,
                made.result_bundle_bytes,
                out.display()
            );
        }
        BundleCommand::Publish {
            file,
            keys,
            targets_expires_in,
            delta_from,
            no_deltas,
        } => {
            let admin = admin.ok_or_else(|| anyhow!("publishing needs the control plane"))?;
            let mut published = Vec::new();
            if delta_from.is_empty() || !published_already(admin, &file).await? {
                published.push(publish(admin, &file, &keys, targets_expires_in).await?);
            }
            for base in &delta_from {
                published.push(publish_delta(admin, base, &file, &keys, targets_expires_in).await?);
            }
            if delta_from.is_empty() && !no_deltas {
                let deltas = publish_fleet_deltas(admin, &file, &keys, targets_expires_in).await?;
                published.extend(deltas);
            }
            print_bundles(&published, output)?;
        }
        BundleCommand::List { name } => {
            let admin = admin.ok_or_else(|| anyhow!("listing needs the control plane"))?;
            let bundles = admin.list_bundles(name.unwrap_or_default()).await?;
            print_bundles(&bundles, output)?;
        }
    }
    Ok(())
}

fn open(file: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))
}

/// The published targets metadata.
async fn current_targets(admin: &mut Admin) -> anyhow::Result<Targets> {
    let repository = admin.repository().await?;
    if repository.targets_json.is_empty() {
        bail!("the repository is not initialized; run `posfleet keys init`");
    }
    Ok(tuf::parse_envelope(TARGETS, &repository.targets_json, u64::MAX)?.decode(TARGETS)?)
}

/// Whether bundle `file` is published already, these very bytes; a bundle
/// of that name and version with other bytes is an error.
async fn published_already(admin: &mut Admin, file: &Path) -> anyhow::Result<bool> {
    let manifest = archive::read_manifest(open(file)?)?;
    let sha256 = hex::encode(chunks::digest_reader(open(file)?)?.sha256);
    let name = manifest.target_name();
    match current_targets(admin).await?.targets.get(&name) {
        None => Ok(false),
        Some(entry) if entry.sha256() == Some(sha256.as_str()) => Ok(true),
        Some(_) => bail!(
            "{name} is published with other bytes than {}; bump the version in posfleet-bundle.toml",
            file.display()
        ),
    }
}

/// Signs the next targets metadata, the current one plus `entry` named
/// `name`, and uploads it with `file`.
async fn publish_entry(
    admin: &mut Admin,
    keys: &Path,
    targets_expires_in: Duration,
    current: Targets,
    (name, entry): (String, tuf::TargetFile),
    file: &Path,
) -> anyhow::Result<v1::Bundle> {
    let signers = read_keys(keys, TARGETS)?;
    if signers.is_empty() {
        bail!("no targets-*.key in {}", keys.display());
    }
    let mut entries = current.targets;
    entries.insert(name.clone(), entry);
    let targets = repo::targets(
        current.version + 1,
        Utc::now() + chrono_duration(targets_expires_in),
        entries,
    );
    let targets_json = tuf::sign(&targets, &signers.iter().collect::<Vec<_>>());
    admin
        .publish(targets_json, Some((name, file.to_path_buf())))
        .await
}

/// Signs `file` into the next targets metadata and uploads both.
pub async fn publish(
    admin: &mut Admin,
    file: &Path,
    keys: &Path,
    targets_expires_in: Duration,
) -> anyhow::Result<v1::Bundle> {
    let manifest = archive::read_manifest(open(file)?)?;
    let digest = chunks::digest_reader(open(file)?)?;
    let current = current_targets(admin).await?;
    let name = manifest.target_name();
    if current.targets.contains_key(&name) {
        bail!("{name} is already published; bump the version in posfleet-bundle.toml");
    }
    let entry = repo::target_file(&manifest, &digest);
    publish_entry(
        admin,
        keys,
        targets_expires_in,
        current,
        (name, entry),
        file,
    )
    .await
}

/// At most this many deltas are made by default: from the versions most
/// tills run.
const FLEET_DELTA_BASES: usize = 3;

/// Publishes deltas to `file` (published) from the earlier versions of it
/// that tills run, most run first, at most [`FLEET_DELTA_BASES`], each
/// fetched from the control plane (`DownloadBundle`) into a temporary
/// folder; versions that have one already are left out. A delta that
/// cannot be made is reported and skipped: tills then fetch the bundle.
async fn publish_fleet_deltas(
    admin: &mut Admin,
    file: &Path,
    keys: &Path,
    targets_expires_in: Duration,
) -> anyhow::Result<Vec<v1::Bundle>> {
    let manifest = archive::read_manifest(open(file)?)?;
    let listed = admin.list_bundles(manifest.name.clone()).await?;
    let version = manifest.version.to_string();
    let mut bases: Vec<&v1::Bundle> = listed
        .iter()
        .filter(|b| b.delta_from.is_empty() && b.active_devices > 0)
        .filter(|b| semver::Version::parse(&b.version).is_ok_and(|v| v < manifest.version))
        .filter(|b| {
            !listed
                .iter()
                .any(|d| d.version == version && d.delta_from == b.version)
        })
        .collect();
    bases.sort_by_key(|b| std::cmp::Reverse(b.active_devices));
    bases.truncate(FLEET_DELTA_BASES);
    let dir = tempfile::tempdir()?;
    let mut published = Vec::new();
    for base in bases {
        let path = dir
            .path()
            .join(format!("{}-{}.bundle", base.name, base.version));
        let made = async {
            admin.download_bundle(&base.target, &path).await?;
            publish_delta(admin, &path, file, keys, targets_expires_in).await
        }
        .await;
        match made {
            Ok(delta) => {
                eprintln!(
                    "Published a delta from {} ({} tills run it): {} bytes.",
                    base.target, base.active_devices, delta.length
                );
                published.push(delta);
            }
            Err(error) => eprintln!(
                "No delta from {} ({} tills run it; they will fetch the whole bundle): {error:#}",
                base.target, base.active_devices
            ),
        }
        let _ = std::fs::remove_file(&path);
    }
    Ok(published)
}

/// Makes the delta from `base` (an earlier version's bundle file, as
/// published) to `file` (published) and publishes it, signed.
pub async fn publish_delta(
    admin: &mut Admin,
    base: &Path,
    file: &Path,
    keys: &Path,
    targets_expires_in: Duration,
) -> anyhow::Result<v1::Bundle> {
    let current = current_targets(admin).await?;
    let published = |path: &Path, targets: &Targets| -> anyhow::Result<(String, tuf::TargetFile)> {
        let name = archive::read_manifest(open(path)?)?.target_name();
        let sha256 = hex::encode(chunks::digest_reader(open(path)?)?.sha256);
        let entry = targets.targets.get(&name).ok_or_else(|| {
            anyhow!("{name} is not published: publish it before a delta from or to it")
        })?;
        if entry.sha256() != Some(sha256.as_str()) {
            bail!(
                "{} is not the published {name}: its SHA-256 differs",
                path.display()
            );
        }
        Ok((name, entry.clone()))
    };
    let base_target = published(base, &current)?;
    let result_target = published(file, &current)?;
    let made_in = tempfile::tempdir().context("cannot make a folder for the delta")?;
    let delta_file = made_in.path().join("bundle.delta");
    let made = posfleet_bundle::delta::make_from_bundles(base, file, &delta_file)?;
    let name = repo::delta_target_name(&made.result, &made.base);
    if current.targets.contains_key(&name) {
        bail!("{name} is already published");
    }
    if made.delta_bytes > made.result_bundle_bytes / 2 {
        bail!(
            "{name} would be {} bytes, more than half the bundle's {}: \
             not worth a till's rebuild, not published",
            made.delta_bytes,
            made.result_bundle_bytes
        );
    }
    let digest = chunks::digest_reader(open(&delta_file)?)?;
    let entry = repo::delta_target_file(
        &made.result,
        &digest,
        (&base_target.0, &base_target.1),
        (&result_target.0, &result_target.1),
    )?;
    publish_entry(
        admin,
        keys,
        targets_expires_in,
        current,
        (name, entry),
        &delta_file,
    )
    .await
}

pub fn print_bundles(bundles: &[v1::Bundle], output: Output) -> anyhow::Result<()> {
    #[derive(serde::Serialize)]
    struct View<'a> {
        target: &'a str,
        kind: &'a str,
        hardware: &'a [String],
        length: u64,
        sha256: &'a str,
        targets_version: u64,
        published_at: String,
        /// On a delta: the version it rebuilds the bundle from.
        #[serde(skip_serializing_if = "str::is_empty")]
        delta_from: &'a str,
        /// Devices whose confirmed version this is.
        active_devices: u64,
    }
    let views: Vec<View> = bundles
        .iter()
        .map(|b| View {
            target: &b.target,
            kind: &b.kind,
            hardware: &b.hardware,
            length: b.length,
            sha256: &b.sha256,
            targets_version: b.targets_version,
            published_at: crate::view::time(b.published_at_unix_ms),
            delta_from: &b.delta_from,
            active_devices: b.active_devices,
        })
        .collect();
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
        .set_header(vec![
            "BUNDLE",
            "KIND",
            "HARDWARE",
            "BYTES",
            "SHA256",
            "PUBLISHED",
            "ACTIVE ON",
        ]);
    for v in &views {
        table.add_row(vec![
            v.target.to_string(),
            v.kind.to_string(),
            v.hardware.join(","),
            v.length.to_string(),
            v.sha256.chars().take(16).collect::<String>(),
            v.published_at.clone(),
            match v.delta_from.is_empty() {
                true => format!("{} devices", v.active_devices),
                false => "-".into(),
            },
        ]);
    }
    println!("{table}");
    Ok(())
}

/// Streams a file in 1 MiB pieces after the header.
/// How far an upload got: when the server last took a message, and
/// whether it has taken them all.
pub struct UploadProgress {
    last_taken: std::sync::Mutex<std::time::Instant>,
    all_sent: std::sync::atomic::AtomicBool,
}

impl UploadProgress {
    fn taken(&self, last: bool) {
        *self.last_taken.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
        if last {
            self.all_sent
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Resolves, with the error to show, once the server has taken nothing
    /// for `idle` while the upload is under way, or has not answered
    /// `answer` after taking all of it. Never resolves otherwise.
    pub async fn stalled(&self, idle: Duration, answer: Duration) -> anyhow::Error {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let since = self
                .last_taken
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed();
            if self.all_sent.load(std::sync::atomic::Ordering::SeqCst) {
                if since > answer {
                    return anyhow!(
                        "the control plane did not answer within {} s of the end of the upload",
                        answer.as_secs()
                    );
                }
            } else if since > idle {
                return anyhow!(
                    "the upload made no progress for {} s; nothing was published",
                    idle.as_secs()
                );
            }
        }
    }
}

/// An upload's messages as gRPC takes them, noting each in its progress.
pub struct UploadStream {
    inner: tokio_stream::wrappers::ReceiverStream<v1::PublishBundleRequest>,
    progress: std::sync::Arc<UploadProgress>,
}

impl tokio_stream::Stream for UploadStream {
    type Item = v1::PublishBundleRequest;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let next = std::pin::Pin::new(&mut self.inner).poll_next(cx);
        if let std::task::Poll::Ready(item) = &next {
            self.progress.taken(item.is_none());
        }
        next
    }
}

/// The messages of an upload: the header, then `file` in 1 MiB pieces, read
/// as gRPC takes them; and its progress, to tell a slow link (fine) from a
/// stalled one.
pub fn upload_stream(
    header: v1::PublishBundleHeader,
    file: Option<PathBuf>,
) -> (UploadStream, std::sync::Arc<UploadProgress>) {
    use v1::publish_bundle_request::Part;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        if tx
            .blocking_send(v1::PublishBundleRequest {
                part: Some(Part::Header(header)),
            })
            .is_err()
        {
            return;
        }
        let Some(path) = file else { return };
        let Ok(mut file) = std::fs::File::open(&path) else {
            return;
        };
        let mut buf = vec![0u8; chunks::CHUNK_SIZE as usize];
        loop {
            match file.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let part = Some(Part::Data(buf[..n].to_vec()));
                    if tx.blocking_send(v1::PublishBundleRequest { part }).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let progress = std::sync::Arc::new(UploadProgress {
        last_taken: std::sync::Mutex::new(std::time::Instant::now()),
        all_sent: std::sync::atomic::AtomicBool::new(false),
    });
    let stream = UploadStream {
        inner: tokio_stream::wrappers::ReceiverStream::new(rx),
        progress: progress.clone(),
    };
    (stream, progress)
}
