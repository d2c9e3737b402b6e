//! delta-bench: which way of shipping a bundle as a delta from an earlier
//! version suits posfleet's bundles, measured side by side in one run.
//!
//! Three changes, each a pair of real bundles built by
//! `posfleet_bundle::archive::build` (tar + zstd level 9):
//!
//! - `catalog`: a 20 MiB price catalog (`products.csv`) whose next version
//!   changes the price of 1 % of its rows, scattered through the file;
//! - `pos-app-script`: the example POS program beside 16 MiB of libraries
//!   (eight files of incompressible bytes), its start script changed;
//! - `pos-app-library`: the same program with one 2 MiB library rebuilt.
//!
//! Methods, each on the bundles' uncompressed tar streams (compressed
//! streams share almost nothing from one version to the next):
//!
//! - `zstd-patch`: zstd with the earlier tar as a reference prefix
//!   (`zstd --patch-from`), level 19, long-distance matching, a window
//!   covering both;
//! - `zstd-segments`: `posfleet_bundle::delta`, the same in pieces: the
//!   new tar cut into 4 MiB segments, each a zstd frame (level 19) against
//!   the 8 MiB of the earlier tar around where its bytes were, so a till
//!   holds one region and one segment at a time, reading the earlier tar
//!   from disk;
//! - `cdc-16k`, `cdc-2k`: content-defined chunks (FastCDC 2020, average
//!   16 KiB or 2 KiB): the delta holds the new version's recipe (SHA-256 and
//!   length of each chunk) and, compressed together, the chunks the earlier
//!   version lacks.
//!
//! A till applies a delta in a process of its own (this program, run again
//! as `delta-bench apply`): it rebuilds the tar from its copy of the earlier
//! bundle and the delta, compresses it as `archive::build` does and checks
//! the SHA-256 against the new bundle's. Its wall time and peak RSS are
//! measured, medians of `--runs`, beside a full install's first step
//! (decompressing the new bundle) in the same run. Figures go to a JSON file.
//!
//!     cargo run --release -p posfleet-e2e --bin delta-bench

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};
use posfleet_e2e::pseudo_random_bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const MIB: usize = 1 << 20;
/// The level `posfleet_bundle::archive` packs bundles with.
const BUNDLE_ZSTD_LEVEL: i32 = 9;
/// The level deltas are made with (once, by the publisher).
const DELTA_ZSTD_LEVEL: i32 = 19;

#[derive(Debug, Parser)]
#[command(about = "Compare delta methods for posfleet bundles, side by side.")]
struct Args {
    #[command(subcommand)]
    command: Option<Step>,
    /// Timed applies per method and change (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Catalog size in MiB.
    #[arg(long, default_value_t = 20)]
    catalog_mib: usize,
    #[arg(long, default_value = "benchmarks/delta-bench.json")]
    output: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Step {
    /// What a till does (run by the benchmark): rebuild a bundle from the
    /// earlier bundle and a delta, or decompress a full bundle.
    Apply {
        /// zstd-patch, zstd-segments, cdc or full.
        method: String,
        /// The earlier bundle (unused for `full`).
        base: PathBuf,
        /// The delta, or the full bundle.
        delta: PathBuf,
        /// Where the rebuilt bundle (or, for `full`, the tar) goes.
        out: PathBuf,
        /// Hex SHA-256 the rebuilt bundle must have.
        #[arg(long)]
        sha256: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Some(Step::Apply {
            method,
            base,
            delta,
            out,
            sha256,
        }) => apply(&method, &base, &delta, &out, sha256.as_deref()),
        None => bench(&args),
    }
}

// ----- the changes -----

/// Writes `posfleet-bundle.toml` for `name` `version` of `kind`.
fn manifest(dir: &Path, name: &str, version: &str, kind: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("posfleet-bundle.toml"),
        format!(
            "name = \"{name}\"\nversion = \"{version}\"\nkind = \"{kind}\"\nhardware = [\"*\"]\n"
        ),
    )?;
    Ok(())
}

/// A catalog of about `mib` MiB: one product a row. With `changed`, one
/// row in a hundred (spread through the file) has another price.
fn catalog_rows(mib: usize, changed: bool) -> String {
    const WORDS: [&str; 16] = [
        "organic",
        "whole",
        "milk",
        "bread",
        "coffee",
        "beans",
        "apple",
        "juice",
        "dark",
        "chocolate",
        "pasta",
        "tomato",
        "sauce",
        "olive",
        "oil",
        "rice",
    ];
    let mut text = String::from("sku;name;price;vat;barcode;category\n");
    let mut row = 0usize;
    while text.len() < mib * MIB {
        let pick = |n: usize| WORDS[(row.wrapping_mul(2_654_435_761) >> n) % WORDS.len()];
        let mut cents = (row.wrapping_mul(40_503) % 9_900) + 99;
        if changed && row % 100 == 37 {
            cents += 10;
        }
        text.push_str(&format!(
            "{:08};{} {} {};{}.{:02};{};{:013};{}\n",
            row,
            pick(3),
            pick(7),
            pick(11),
            cents / 100,
            cents % 100,
            [5.5, 10.0, 20.0][row % 3],
            4_000_000_000_000u64 + row as u64 * 7,
            pick(13),
        ));
        row += 1;
    }
    text
}

fn catalog(dir: &Path, version: &str, mib: usize, changed: bool) -> anyhow::Result<()> {
    manifest(dir, "catalog", version, "catalog")?;
    std::fs::write(dir.join("products.csv"), catalog_rows(mib, changed))?;
    Ok(())
}

/// The example POS program with eight 2 MiB libraries; `script` is
/// appended to its start script and `rebuilt` names a library made anew.
fn pos_app(dir: &Path, version: &str, script: &str, rebuilt: Option<usize>) -> anyhow::Result<()> {
    manifest(dir, "pos-app", version, "software")?;
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pos-app/bin/pos-app");
    std::fs::create_dir_all(dir.join("bin"))?;
    let mut start = std::fs::read_to_string(&example).context("the example POS program")?;
    start.push_str(script);
    std::fs::write(dir.join("bin/pos-app"), start)?;
    std::fs::create_dir_all(dir.join("lib"))?;
    for i in 0..8 {
        let seed = if rebuilt == Some(i) { 1000 + i } else { i + 1 };
        std::fs::write(
            dir.join(format!("lib/libpos{i}.so")),
            pseudo_random_bytes(seed as u64, 2 * MIB),
        )?;
    }
    Ok(())
}

// ----- tars and bundles -----

fn tar_of(bundle: &Path) -> anyhow::Result<Vec<u8>> {
    let mut tar = Vec::new();
    zstd::Decoder::new(File::open(bundle)?)?.read_to_end(&mut tar)?;
    Ok(tar)
}

/// Compresses `tar` as `archive::build` does (default streaming encoder,
/// level 9), into `out`; returns its SHA-256.
fn pack(tar: &mut impl Read, out: &Path) -> anyhow::Result<String> {
    let mut hashing = HashingWriter {
        inner: BufWriter::new(File::create(out)?),
        hash: Sha256::new(),
    };
    let mut encoder = zstd::Encoder::new(&mut hashing, BUNDLE_ZSTD_LEVEL)?;
    std::io::copy(tar, &mut encoder)?;
    encoder.finish()?;
    hashing.inner.flush()?;
    Ok(hex::encode(hashing.hash.finalize()))
}

struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut hash = Sha256::new();
    std::io::copy(&mut File::open(path)?, &mut hash)?;
    Ok(hex::encode(hash.finalize()))
}

/// log2 of a zstd window covering `bytes`.
fn window_log(bytes: usize) -> u32 {
    (usize::BITS - bytes.next_power_of_two().leading_zeros()).clamp(20, 31)
}

// ----- making deltas (the publisher) -----

fn zstd_patch(base: &[u8], new: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut encoder = zstd::Encoder::with_ref_prefix(Vec::new(), DELTA_ZSTD_LEVEL, base)?;
    encoder.long_distance_matching(true)?;
    encoder.window_log(window_log(base.len().max(new.len())))?;
    encoder.set_pledged_src_size(Some(new.len() as u64))?;
    encoder.write_all(new)?;
    Ok(encoder.finish()?)
}

/// Average, smallest and largest chunk of a CDC method.
fn cdc_sizes(average: u32) -> (u32, u32, u32) {
    (average / 4, average, average * 4)
}

/// A CDC delta: `u32` average chunk size and `u32` chunk count, then per
/// chunk of the new tar its SHA-256 and `u32` length, then the chunks the
/// base lacks, in recipe order, as one zstd stream.
fn cdc_delta(base: &[u8], new: &[u8], average: u32) -> anyhow::Result<Vec<u8>> {
    let (min, avg, max) = cdc_sizes(average);
    let known: HashSet<[u8; 32]> = fastcdc::v2020::FastCDC::new(base, min, avg, max)
        .map(|c| Sha256::digest(&base[c.offset..c.offset + c.length]).into())
        .collect();
    let mut recipe = Vec::new();
    let mut missing = Vec::new();
    let chunks: Vec<_> = fastcdc::v2020::FastCDC::new(new, min, avg, max).collect();
    recipe.extend_from_slice(&average.to_le_bytes());
    recipe.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    for c in chunks {
        let bytes = &new[c.offset..c.offset + c.length];
        let digest: [u8; 32] = Sha256::digest(bytes).into();
        recipe.extend_from_slice(&digest);
        recipe.extend_from_slice(&(c.length as u32).to_le_bytes());
        if !known.contains(&digest) {
            missing.extend_from_slice(bytes);
        }
    }
    recipe.extend(zstd::encode_all(&missing[..], DELTA_ZSTD_LEVEL)?);
    Ok(recipe)
}

// ----- applying deltas (the till) -----

fn apply(
    method: &str,
    base: &Path,
    delta: &Path,
    out: &Path,
    sha256: Option<&str>,
) -> anyhow::Result<()> {
    let digest = match method {
        "full" => {
            let mut tar = BufWriter::new(File::create(out)?);
            std::io::copy(&mut zstd::Decoder::new(File::open(delta)?)?, &mut tar)?;
            tar.flush()?;
            None
        }
        "zstd-patch" => {
            // The reference prefix is the whole earlier tar, in memory.
            let base = tar_of(base)?;
            let mut decoder =
                zstd::Decoder::with_ref_prefix(BufReader::new(File::open(delta)?), &base)?;
            decoder.window_log_max(31)?;
            Some(pack(&mut decoder, out)?)
        }
        "zstd-segments" => Some(apply_segments(base, delta, out)?),
        "cdc" => Some(apply_cdc(base, delta, out)?),
        other => bail!("unknown method {other}"),
    };
    if let (Some(want), Some(got)) = (sha256, &digest) {
        ensure!(
            want == got,
            "the rebuilt bundle's SHA-256 is {got}, not {want}"
        );
    }
    let peak = posfleet_e2e::peak_rss_bytes("self").unwrap_or(0);
    println!("{peak}");
    Ok(())
}

/// The earlier bundle's tar, written beside `out`; returns its path.
fn base_tar_file(base: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let dir = out.parent().context("out has a folder")?;
    let path = dir.join("base.tar");
    let mut file = BufWriter::new(File::create(&path)?);
    std::io::copy(&mut zstd::Decoder::new(File::open(base)?)?, &mut file)?;
    file.flush()?;
    Ok(path)
}

/// Rebuilds with `posfleet_bundle::delta::apply`, the earlier tar on
/// disk, packing as it goes.
fn apply_segments(base: &Path, delta: &Path, out: &Path) -> anyhow::Result<String> {
    let base_tar_path = base_tar_file(base, out)?;
    let mut base_tar = File::open(&base_tar_path)?;
    let length = base_tar.metadata()?.len();
    let mut hashing = HashingWriter {
        inner: BufWriter::new(File::create(out)?),
        hash: Sha256::new(),
    };
    let mut encoder = zstd::Encoder::new(&mut hashing, BUNDLE_ZSTD_LEVEL)?;
    posfleet_bundle::delta::apply(
        &mut base_tar,
        length,
        &mut BufReader::new(File::open(delta)?),
        &mut encoder,
    )?;
    encoder.finish()?;
    hashing.inner.flush()?;
    std::fs::remove_file(base_tar_path)?;
    Ok(hex::encode(hashing.hash.finalize()))
}

/// Rebuilds with the earlier tar on disk and an index of its chunks in
/// memory (offset and length by SHA-256), streaming both.
fn apply_cdc(base: &Path, delta: &Path, out: &Path) -> anyhow::Result<String> {
    let dir = out.parent().context("out has a folder")?;
    let base_tar_path = base_tar_file(base, out)?;
    let mut delta = BufReader::new(File::open(delta)?);
    let mut word = [0u8; 4];
    delta.read_exact(&mut word)?;
    let average = u32::from_le_bytes(word);
    delta.read_exact(&mut word)?;
    let count = u32::from_le_bytes(word) as usize;
    let mut recipe = Vec::with_capacity(count);
    for _ in 0..count {
        let mut digest = [0u8; 32];
        delta.read_exact(&mut digest)?;
        delta.read_exact(&mut word)?;
        recipe.push((digest, u32::from_le_bytes(word) as usize));
    }
    let (min, avg, max) = cdc_sizes(average);
    let mut index: HashMap<[u8; 32], (u64, usize)> = HashMap::new();
    for chunk in fastcdc::v2020::StreamCDC::new(File::open(&base_tar_path)?, min, avg, max) {
        let chunk = chunk?;
        index.insert(
            Sha256::digest(&chunk.data).into(),
            (chunk.offset, chunk.length),
        );
    }
    let mut missing = zstd::Decoder::new(delta)?;
    let mut base_tar = File::open(&base_tar_path)?;
    let tar_path = dir.join("rebuilt.tar");
    let mut tar = BufWriter::new(File::create(&tar_path)?);
    let mut buf = Vec::new();
    for (digest, len) in &recipe {
        buf.resize(*len, 0);
        if let Some(&(at, length)) = index.get(digest) {
            ensure!(length == *len, "chunk length mismatch");
            base_tar.seek(SeekFrom::Start(at))?;
            base_tar.read_exact(&mut buf)?;
        } else {
            missing.read_exact(&mut buf)?;
        }
        ensure!(
            <[u8; 32]>::from(Sha256::digest(&buf)) == *digest,
            "a chunk does not match its recipe"
        );
        tar.write_all(&buf)?;
    }
    tar.flush()?;
    drop(tar);
    let digest = pack(&mut BufReader::new(File::open(&tar_path)?), out)?;
    std::fs::remove_file(tar_path)?;
    std::fs::remove_file(base_tar_path)?;
    Ok(digest)
}

// ----- the benchmark -----

#[derive(Debug, Serialize)]
struct Figures {
    command: String,
    commit: String,
    runs: usize,
    changes: Vec<Change>,
}

#[derive(Debug, Serialize)]
struct Change {
    name: String,
    base_bundle_bytes: u64,
    full_bundle_bytes: u64,
    /// Whether packing the new tar again gives the new bundle's exact bytes
    /// (what every method relies on to check the signed hash).
    repacks_identically: bool,
    /// A full install's first step: decompressing the new bundle.
    full_unpack_seconds: f64,
    full_unpack_peak_rss_bytes: u64,
    methods: Vec<Method>,
}

#[derive(Debug, Serialize)]
struct Method {
    method: String,
    delta_bytes: u64,
    /// Delta bytes over full-bundle bytes.
    ratio: f64,
    make_seconds: f64,
    apply_seconds: f64,
    apply_peak_rss_bytes: u64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs `delta-bench apply …` `runs` times: (median seconds, largest peak RSS).
fn timed_apply(
    runs: usize,
    args: &[&Path],
    method: &str,
    sha256: Option<&str>,
) -> anyhow::Result<(f64, u64)> {
    let me = std::env::current_exe()?;
    let mut seconds = Vec::new();
    let mut peak = 0u64;
    for _ in 0..runs {
        let mut command = Command::new(&me);
        command.arg("apply").arg(method).args(args);
        if let Some(sha) = sha256 {
            command.args(["--sha256", sha]);
        }
        let start = Instant::now();
        let output = command.output()?;
        seconds.push(start.elapsed().as_secs_f64());
        ensure!(
            output.status.success(),
            "apply {method} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let printed = String::from_utf8_lossy(&output.stdout);
        peak = peak.max(printed.trim().parse().unwrap_or(0));
    }
    Ok((median(seconds), peak))
}

fn measure(
    name: &str,
    base_dir: &Path,
    new_dir: &Path,
    work: &Path,
    runs: usize,
) -> anyhow::Result<Change> {
    let base_bundle = work.join(format!("{name}-base.bundle"));
    let new_bundle = work.join(format!("{name}-new.bundle"));
    posfleet_bundle::archive::build(base_dir, &base_bundle)?;
    posfleet_bundle::archive::build(new_dir, &new_bundle)?;
    let full = std::fs::metadata(&new_bundle)?.len();
    let want = sha256_file(&new_bundle)?;
    let base_tar = tar_of(&base_bundle)?;
    let new_tar = tar_of(&new_bundle)?;
    let repacked = pack(&mut &new_tar[..], &work.join("repacked.bundle"))?;
    let out = work.join("out");
    let (full_unpack_seconds, full_unpack_peak) =
        timed_apply(runs, &[&base_bundle, &new_bundle, &out], "full", None)?;
    let mut methods = Vec::new();
    for (method, apply_as) in [
        ("zstd-patch", "zstd-patch"),
        ("zstd-segments", "zstd-segments"),
        ("cdc-16k", "cdc"),
        ("cdc-2k", "cdc"),
    ] {
        let start = Instant::now();
        let delta = match method {
            "zstd-patch" => zstd_patch(&base_tar, &new_tar)?,
            "zstd-segments" => posfleet_bundle::delta::make(&base_tar, &new_tar)?,
            "cdc-16k" => cdc_delta(&base_tar, &new_tar, 16 * 1024)?,
            _ => cdc_delta(&base_tar, &new_tar, 2048)?,
        };
        let make_seconds = start.elapsed().as_secs_f64();
        let delta_path = work.join(format!("{name}-{method}.delta"));
        std::fs::write(&delta_path, &delta)?;
        let (apply_seconds, apply_peak) = timed_apply(
            runs,
            &[&base_bundle, &delta_path, &out],
            apply_as,
            Some(&want),
        )?;
        eprintln!(
            "{name} {method}: {} bytes ({:.4} of {full}), applied in {apply_seconds:.2} s, peak RSS {} MiB",
            delta.len(),
            delta.len() as f64 / full as f64,
            apply_peak >> 20
        );
        methods.push(Method {
            method: method.into(),
            delta_bytes: delta.len() as u64,
            ratio: delta.len() as f64 / full as f64,
            make_seconds,
            apply_seconds,
            apply_peak_rss_bytes: apply_peak,
        });
    }
    Ok(Change {
        name: name.into(),
        base_bundle_bytes: std::fs::metadata(&base_bundle)?.len(),
        full_bundle_bytes: full,
        repacks_identically: repacked == want,
        full_unpack_seconds,
        full_unpack_peak_rss_bytes: full_unpack_peak,
        methods,
    })
}

fn bench(args: &Args) -> anyhow::Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    let work = tempfile::tempdir()?;
    let w = work.path();
    let mut changes = Vec::new();

    catalog(&w.join("catalog-1"), "2026.1.0", args.catalog_mib, false)?;
    catalog(&w.join("catalog-2"), "2026.1.1", args.catalog_mib, true)?;
    changes.push(measure(
        "catalog",
        &w.join("catalog-1"),
        &w.join("catalog-2"),
        w,
        args.runs,
    )?);

    pos_app(&w.join("app-1"), "1.0.0", "", None)?;
    pos_app(
        &w.join("app-2"),
        "1.0.1",
        "# 1.0.1: a fix in the start script\n",
        None,
    )?;
    pos_app(&w.join("app-3"), "1.0.1", "", Some(3))?;
    changes.push(measure(
        "pos-app-script",
        &w.join("app-1"),
        &w.join("app-2"),
        w,
        args.runs,
    )?);
    changes.push(measure(
        "pos-app-library",
        &w.join("app-1"),
        &w.join("app-3"),
        w,
        args.runs,
    )?);

    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let figures = Figures {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        commit,
        runs: args.runs,
        changes,
    };
    if let Some(dir) = args.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.output, serde_json::to_string_pretty(&figures)?)?;
    println!("{}", serde_json::to_string_pretty(&figures)?);
    Ok(())
}
