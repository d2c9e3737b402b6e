//! Following an application's log file (`log_paths`) into the store, the
//! way `tail -F` does: complete lines only, across rotation (the file
//! renamed and a new one made: the rest of the old one is read first) and
//! truncation (copytruncate: read again from the start). Where each file
//! was left is saved, so a restart goes on from there.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Most bytes read from one file per poll (the rest at the next ones).
const READ_PER_POLL: usize = 1024 * 1024;
/// A file seen for the first time is read from at most this far before
/// its end.
pub const FIRST_READ_BACKLOG: u64 = 1024 * 1024;

/// Where a followed file was left: which file (device and inode) and how
/// far into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
}

pub struct Tailer {
    path: PathBuf,
    file: Option<(File, Position)>,
    /// Where the last run left this path, used by the first open.
    saved: Option<Position>,
    /// Whether the path was opened before (a file found later is new: read
    /// from its start).
    opened_before: bool,
    partial: Vec<u8>,
}

impl Tailer {
    pub fn new(path: &Path, saved: Option<Position>) -> Tailer {
        Tailer {
            path: path.to_path_buf(),
            file: None,
            saved,
            opened_before: false,
            partial: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the file is read up to, to save.
    pub fn position(&self) -> Option<Position> {
        self.file
            .as_ref()
            .map(|(_, position)| *position)
            .or(self.saved)
    }

    /// The complete lines written since the last poll. Errors (a missing
    /// file, no permission) leave the tailer waiting for the file.
    pub fn poll(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        if self.file.is_none() && !self.open() {
            return lines;
        }
        self.read_available(&mut lines);
        // Rotated: the path names another file now. The old one was read to
        // its end above; its unterminated last line ends with it.
        let now = std::fs::metadata(&self.path).ok();
        let current = self.file.as_ref().map(|(_, position)| *position);
        if let (Some(meta), Some(position)) = (now, current) {
            if (meta.dev(), meta.ino()) != (position.dev, position.ino) {
                self.flush_partial(&mut lines);
                self.file = None;
                if self.open() {
                    self.read_available(&mut lines);
                }
            } else if meta.len() < position.offset {
                // Truncated in place: what is there now is new.
                self.partial.clear();
                if let Some((_, position)) = self.file.as_mut() {
                    position.offset = 0;
                }
                self.read_available(&mut lines);
            }
        }
        lines
    }

    /// Opens the path: where the last run left it if it is the same file,
    /// from its start if it appeared while following, else its last
    /// [`FIRST_READ_BACKLOG`] bytes from a line start.
    fn open(&mut self) -> bool {
        let Ok(mut file) = File::open(&self.path) else {
            return false;
        };
        let Ok(meta) = file.metadata() else {
            return false;
        };
        let (dev, ino, len) = (meta.dev(), meta.ino(), meta.len());
        let saved = self
            .saved
            .take()
            .filter(|s| (s.dev, s.ino) == (dev, ino) && s.offset <= len);
        let offset = match saved {
            Some(saved) => saved.offset,
            None if self.opened_before => 0,
            None => {
                let start = len.saturating_sub(FIRST_READ_BACKLOG);
                if start == 0 {
                    0
                } else {
                    next_line_start(&mut file, start).unwrap_or(len)
                }
            }
        };
        self.opened_before = true;
        self.file = Some((file, Position { dev, ino, offset }));
        true
    }

    fn read_available(&mut self, lines: &mut Vec<String>) {
        let Some((file, position)) = self.file.as_mut() else {
            return;
        };
        if file.seek(SeekFrom::Start(position.offset)).is_err() {
            return;
        }
        let mut buffer = Vec::new();
        let Ok(read) = file.take(READ_PER_POLL as u64).read_to_end(&mut buffer) else {
            return;
        };
        position.offset += read as u64;
        self.partial.extend_from_slice(&buffer);
        let mut start = 0;
        while let Some(end) = self.partial[start..].iter().position(|b| *b == b'\n') {
            let line = &self.partial[start..start + end];
            lines.push(line_text(line));
            start += end + 1;
        }
        self.partial.drain(..start);
        // A line with no end in sight is stored in pieces.
        if self.partial.len() > super::store::MAX_LINE_BYTES {
            self.flush_partial(lines);
        }
    }

    fn flush_partial(&mut self, lines: &mut Vec<String>) {
        if !self.partial.is_empty() {
            lines.push(line_text(&self.partial));
            self.partial.clear();
        }
    }
}

fn line_text(bytes: &[u8]) -> String {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    String::from_utf8_lossy(bytes).into_owned()
}

/// The offset just after the first line break at or after `from`.
fn next_line_start(file: &mut File, from: u64) -> Option<u64> {
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut buffer = vec![0u8; 64 * 1024];
    let mut at = from;
    loop {
        let read = file.read(&mut buffer).ok()?;
        if read == 0 {
            return None;
        }
        if let Some(i) = buffer[..read].iter().position(|b| *b == b'\n') {
            return Some(at + i as u64 + 1);
        }
        at += read as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::io::Write;

    fn append(path: &Path, text: &str) {
        let file = OpenOptions::new().append(true).create(true).open(path);
        file.and_then(|mut f| f.write_all(text.as_bytes())).unwrap();
    }

    #[test]
    fn complete_lines_only_then_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let mut tailer = Tailer::new(&path, None);
        assert!(tailer.poll().is_empty(), "no file yet");
        append(&path, "one\ntwo\r\nthr");
        assert_eq!(tailer.poll(), ["one", "two"]);
        assert!(tailer.poll().is_empty());
        append(&path, "ee\n");
        assert_eq!(tailer.poll(), ["three"]);
    }

    #[test]
    fn rotation_reads_the_old_file_to_its_end_then_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "a\n");
        let mut tailer = Tailer::new(&path, None);
        assert_eq!(tailer.poll(), ["a"]);
        // Written after the last poll, then rotated away (logrotate's create).
        append(&path, "b\nlast without newline");
        std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
        assert_eq!(tailer.poll(), ["b"], "the new file is not there yet");
        append(&path, "c\n");
        assert_eq!(tailer.poll(), ["last without newline", "c"]);
        append(&path, "d\n");
        assert_eq!(tailer.poll(), ["d"]);
    }

    #[test]
    fn truncation_starts_over_from_the_beginning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "first line of a long file\n");
        let mut tailer = Tailer::new(&path, None);
        assert_eq!(tailer.poll(), ["first line of a long file"]);
        // logrotate's copytruncate, then a short line.
        std::fs::write(&path, "new\n").unwrap();
        assert_eq!(tailer.poll(), ["new"]);
    }

    #[test]
    fn a_restart_goes_on_where_the_last_run_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "old\n");
        let mut tailer = Tailer::new(&path, None);
        assert_eq!(tailer.poll(), ["old"]);
        let saved = tailer.position();
        drop(tailer);
        append(&path, "while stopped\n");
        let mut tailer = Tailer::new(&path, saved);
        assert_eq!(tailer.poll(), ["while stopped"]);
        // A saved position of another file (rotated while stopped) is not used.
        std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
        append(&path, "x\n");
        let mut tailer = Tailer::new(&path, saved);
        assert_eq!(tailer.poll(), ["x"]);
    }

    #[test]
    fn a_large_existing_file_is_read_from_its_last_mebibyte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let line = format!("{}\n", "y".repeat(99));
        append(&path, &line.repeat(30_000)); // 3 MB
        append(&path, "newest\n");
        let mut tailer = Tailer::new(&path, None);
        let lines = tailer.poll();
        assert!(
            lines.len() <= 10_486 && lines.len() > 10_000,
            "{}",
            lines.len()
        );
        assert!(lines[..lines.len() - 1].iter().all(|l| l.len() == 99));
        assert_eq!(lines.last().unwrap(), "newest");
    }
}
