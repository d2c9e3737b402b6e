//! The till's log store: segment files under `<data_dir>/logs/`, each line
//! `<unix ms>\t<source>\t<text>\n`, appended to the newest segment. A
//! segment holds at most an eighth of the cap; once the segments pass the
//! cap the oldest is deleted. Nothing is synced: a power cut may lose the
//! last lines, and a line cut short by one is isolated at the next start.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// The source of the agent's own lines.
pub const AGENT_SOURCE: &str = "agent";
/// Longest text kept for one line; a longer one is cut, saying so.
pub const MAX_LINE_BYTES: usize = 8 * 1024;
/// Smallest segment, whatever the cap.
const MIN_SEGMENT_BYTES: u64 = 4 * 1024;
const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".log";

/// One stored line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// When the agent stored it.
    pub unix_ms: i64,
    /// [`AGENT_SOURCE`], or the application log file it came from.
    pub source: String,
    pub text: String,
}

impl Entry {
    /// A line as stored now: one line of text (line breaks become spaces),
    /// at most [`MAX_LINE_BYTES`].
    pub fn new(source: &str, text: &str) -> Entry {
        Entry {
            unix_ms: chrono::Utc::now().timestamp_millis(),
            source: source.to_string(),
            text: bounded(text),
        }
    }
}

/// `text` on one line, cut to [`MAX_LINE_BYTES`] saying so.
pub fn bounded(text: &str) -> String {
    let mut one_line: String = text
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    if one_line.len() > MAX_LINE_BYTES {
        let mut end = MAX_LINE_BYTES;
        while !one_line.is_char_boundary(end) {
            end -= 1;
        }
        let length = one_line.len();
        one_line.truncate(end);
        one_line.push_str(&format!(" … [line cut: it was {length} bytes]"));
    }
    one_line
}

fn encode(entry: &Entry, out: &mut Vec<u8>) {
    let source: String = entry
        .source
        .chars()
        .map(|c| {
            if c == '\t' || c == '\n' || c == '\r' {
                ' '
            } else {
                c
            }
        })
        .collect();
    let text = entry.text.replace(['\n', '\r'], " ");
    out.extend_from_slice(format!("{}\t{source}\t{text}\n", entry.unix_ms).as_bytes());
}

fn decode(line: &str) -> Option<Entry> {
    let mut fields = line.splitn(3, '\t');
    let unix_ms = fields.next()?.parse().ok()?;
    let source = fields.next()?.to_string();
    let text = fields.next()?.to_string();
    Some(Entry {
        unix_ms,
        source,
        text,
    })
}

#[derive(Debug, Clone)]
struct Segment {
    number: u64,
    path: PathBuf,
    len: u64,
}

/// The segments as they were at one moment: each file and how much of it
/// to read (later lines are new).
pub type Snapshot = Vec<(PathBuf, u64)>;

pub struct LogStore {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    /// Oldest first; the last one is written to.
    segments: VecDeque<Segment>,
    active: Option<File>,
}

impl LogStore {
    /// Opens the store in `dir` (made 0700 if missing), keeping at most
    /// `max_bytes` of lines.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<LogStore> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut segments = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(number) = name
                .to_str()
                .and_then(|n| n.strip_prefix(SEGMENT_PREFIX))
                .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            segments.push(Segment {
                number,
                path: entry.path(),
                len: entry.metadata()?.len(),
            });
        }
        segments.sort_by_key(|s| s.number);
        let mut store = LogStore {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes: (max_bytes / 8).max(MIN_SEGMENT_BYTES),
            segments: segments.into(),
            active: None,
        };
        if let Some(last) = store.segments.back_mut() {
            let mut file = OpenOptions::new()
                .append(true)
                .read(true)
                .open(&last.path)?;
            // A line cut short by a power cut ends here; the next starts afresh.
            if last.len > 0 {
                let mut tail = [0u8; 1];
                std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(last.len - 1))?;
                file.read_exact(&mut tail)?;
                if tail[0] != b'\n' {
                    file.write_all(b"\n")?;
                    last.len += 1;
                }
            }
            store.active = Some(file);
            // Written with a larger cap: new lines go to a new segment, so
            // the old one can go at once.
            if last.len > store.segment_bytes {
                store.roll()?;
            }
        }
        store.enforce_cap()?;
        Ok(store)
    }

    /// Appends `entries`, starting a new segment when the newest is full
    /// and deleting the oldest ones beyond the cap.
    pub fn append(&mut self, entries: &[Entry]) -> std::io::Result<()> {
        let mut buffer = Vec::new();
        let mut line = Vec::new();
        for entry in entries {
            line.clear();
            encode(entry, &mut line);
            let used = self.segments.back().map_or(0, |s| s.len) + buffer.len() as u64;
            if self.active.is_none() || (used > 0 && used + line.len() as u64 > self.segment_bytes)
            {
                self.write_active(&buffer)?;
                buffer.clear();
                self.roll()?;
            }
            buffer.extend_from_slice(&line);
        }
        self.write_active(&buffer)?;
        self.enforce_cap()
    }

    fn write_active(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let (Some(file), Some(segment)) = (self.active.as_mut(), self.segments.back_mut()) else {
            return Err(std::io::Error::other("the log store has no open segment"));
        };
        file.write_all(bytes)?;
        segment.len += bytes.len() as u64;
        Ok(())
    }

    fn roll(&mut self) -> std::io::Result<()> {
        let number = self.segments.back().map_or(1, |s| s.number + 1);
        let path = self
            .dir
            .join(format!("{SEGMENT_PREFIX}{number:020}{SEGMENT_SUFFIX}"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)?;
        let len = file.metadata()?.len();
        self.segments.push_back(Segment { number, path, len });
        self.active = Some(file);
        Ok(())
    }

    fn enforce_cap(&mut self) -> std::io::Result<()> {
        while self.total_bytes() > self.max_bytes && self.segments.len() > 1 {
            if let Some(oldest) = self.segments.pop_front() {
                match std::fs::remove_file(&oldest.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Bytes of lines kept.
    pub fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// What is stored now, for [`read`].
    pub fn snapshot(&self) -> Snapshot {
        self.segments
            .iter()
            .map(|s| (s.path.clone(), s.len))
            .collect()
    }
}

/// Calls `visit` with every line of `snapshot`, oldest first. A segment
/// deleted since (the cap) is skipped; so is a line that does not decode.
pub fn read(snapshot: &Snapshot, mut visit: impl FnMut(Entry)) -> std::io::Result<()> {
    for (path, len) in snapshot {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut reader = BufReader::new(file.take(*len));
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&line);
            if let Some(entry) = decode(text.trim_end_matches('\n')) {
                visit(entry);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize) -> Entry {
        Entry {
            unix_ms: n as i64,
            source: "app.log".into(),
            text: format!("line {n:04} {}", "x".repeat(80)),
        }
    }

    fn all(store: &LogStore) -> Vec<Entry> {
        let mut out = Vec::new();
        read(&store.snapshot(), |e| out.push(e)).unwrap();
        out
    }

    #[test]
    fn lines_come_back_as_stored_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), 1024 * 1024).unwrap();
        let odd = Entry {
            unix_ms: 7,
            source: "/var/log/a\tb.log".into(),
            text: "two\nlines\twith a tab".into(),
        };
        store.append(&[entry(1), odd, entry(2)]).unwrap();
        let lines = all(&store);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], entry(1));
        assert_eq!(lines[1].source, "/var/log/a b.log");
        assert_eq!(lines[1].text, "two lines\twith a tab");
        assert_eq!(lines[2], entry(2));
    }

    #[test]
    fn the_cap_drops_the_oldest_lines_first() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 64 * 1024;
        let mut store = LogStore::open(dir.path(), cap).unwrap();
        // About 100 bytes a line: 3,000 lines are over four times the cap.
        for n in 0..3_000 {
            store.append(&[entry(n)]).unwrap();
        }
        assert!(store.total_bytes() <= cap, "{}", store.total_bytes());
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk <= cap, "{on_disk} bytes on disk");
        let lines = all(&store);
        // The newest lines are all there, in order, with no gap.
        assert_eq!(lines.last().unwrap(), &entry(2_999));
        let first = lines[0].unix_ms as usize;
        assert!(first > 0, "the oldest lines were dropped");
        assert_eq!(lines, (first..3_000).map(entry).collect::<Vec<_>>());
        // At least seven eighths of the cap is used.
        assert!(
            store.total_bytes() >= cap * 7 / 8 - 200,
            "{}",
            store.total_bytes()
        );
    }

    #[test]
    fn lines_survive_a_restart_and_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = LogStore::open(dir.path(), 1024 * 1024).unwrap();
            store.append(&[entry(1), entry(2)]).unwrap();
        }
        // A power cut in the middle of a line.
        let segment = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(b"3\tapp.log\tcut sh").unwrap();
        drop(file);
        let mut store = LogStore::open(dir.path(), 1024 * 1024).unwrap();
        store.append(&[entry(4)]).unwrap();
        let texts: Vec<String> = all(&store).into_iter().map(|e| e.text).collect();
        assert_eq!(
            texts,
            [
                entry(1).text,
                entry(2).text,
                "cut sh".to_string(),
                entry(4).text
            ]
        );
        // A store reopened with a smaller cap keeps to it at once.
        for n in 0..2_000 {
            store.append(&[entry(n)]).unwrap();
        }
        drop(store);
        let mut store = LogStore::open(dir.path(), 32 * 1024).unwrap();
        assert!(store.total_bytes() <= 32 * 1024, "{}", store.total_bytes());
        store.append(&[entry(5_000)]).unwrap();
        assert_eq!(all(&store).last().unwrap(), &entry(5_000));
        assert!(store.total_bytes() <= 32 * 1024, "{}", store.total_bytes());
    }

    #[test]
    fn long_lines_are_cut_saying_so() {
        let long = "é".repeat(MAX_LINE_BYTES);
        let cut = bounded(&long);
        assert!(cut.len() < MAX_LINE_BYTES + 64);
        assert!(
            cut.ends_with(&format!("[line cut: it was {} bytes]", long.len())),
            "{cut}"
        );
        assert_eq!(bounded("a\r\nb"), "a  b");
    }
}
