//! A batch's output: JSON Lines, one result per input id, appended as each request
//! finishes and synced to disk at least every second. Read back on the next run to skip
//! what is done; a half-written last line (the process was killed mid-write) is cut
//! off and its request runs again.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;

use super::input::key_of;

/// What an earlier run left in the output.
#[derive(Debug, Default)]
pub struct Previous {
    /// Each id's result: whether the request met `min_successes`.
    pub results: HashMap<String, bool>,
    /// Bytes of a half-written last line that were cut off.
    pub repaired: Option<u64>,
}

impl Previous {
    pub fn is_done(&self, key: &str) -> bool {
        self.results.contains_key(key)
    }
}

/// The part of a result line read back.
#[derive(Deserialize)]
struct Seen {
    id: Value,
    #[serde(default)]
    response: Option<SeenResponse>,
}

#[derive(Deserialize)]
struct SeenResponse {
    ok: bool,
}

/// Reads the output an earlier run left at `path` (none is fine), cutting off a
/// half-written last line. A line in the middle that is not a result is an error: the
/// file was edited, and guessing would lose or repeat work.
pub fn scan(path: &Path) -> anyhow::Result<Previous> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Previous::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut reader = BufReader::with_capacity(256 << 10, file);
    let mut previous = Previous::default();
    let (mut offset, mut number) = (0_u64, 0_u64);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_RESULT_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        number += 1;
        let whole = buf.ends_with(b"\n");
        if !whole && buf.len() > MAX_RESULT_LINE {
            bail!(
                "line {number} of {} is longer than {} MiB: not a result line written by `metaorch batch`; write to a new file",
                path.display(),
                MAX_RESULT_LINE >> 20
            );
        }
        let seen = serde_json::from_slice::<Seen>(&buf)
            .ok()
            .and_then(|s| Some((key_of(&s.id)?, s.response.is_some_and(|r| r.ok))));
        match seen {
            Some((key, ok)) if whole => {
                previous.results.insert(key, ok);
            }
            _ if is_blank(&buf) && whole => {}
            // A last line without its newline: the write a crash cut short. (A whole
            // line that is not a result was not written by a crash.)
            _ if !whole => {
                cut(path, offset)?;
                previous.repaired = Some(n as u64);
                break;
            }
            _ => bail!(
                "line {number} of {} is not a result line written by `metaorch batch`; \
                 was the file edited? Fix or remove that line, or write to a new file",
                path.display()
            ),
        }
        offset += n as u64;
    }
    Ok(previous)
}

/// The longest result line read back: a response with every reply in it.
const MAX_RESULT_LINE: usize = 256 << 20;

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Cuts the file at `len` bytes, durably.
fn cut(path: &Path, len: u64) -> anyhow::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot repair {}", path.display()))?;
    file.set_len(len)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot repair {}", path.display()))
}

/// Rewrites the output without the result lines of `drop` (their requests run again),
/// atomically: a new file, synced, renamed over the old one.
pub fn remove(path: &Path, drop: &HashSet<String>) -> anyhow::Result<()> {
    let tmp = sibling(path, ".retry.tmp");
    let write = || -> io::Result<()> {
        let mut reader = BufReader::with_capacity(256 << 10, File::open(path)?);
        let mut out = BufWriter::with_capacity(256 << 10, File::create(&tmp)?);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf)? == 0 {
                break;
            }
            let key = serde_json::from_slice::<Seen>(&buf)
                .ok()
                .and_then(|s| key_of(&s.id));
            if !key.is_some_and(|k| drop.contains(&k)) {
                out.write_all(&buf)?;
            }
        }
        let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        // The rewritten file keeps the original's permissions.
        file.set_permissions(std::fs::metadata(path)?.permissions())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    };
    write().with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!(
            "cannot rewrite {} without its failed results",
            path.display()
        )
    })
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(suffix);
    path.with_file_name(name)
}

/// Makes a rename in `path`'s directory durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Takes the output's lock, or says who holds it.
fn lock(file: &File, path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock(2) on a descriptor this File owns; it only sets a lock.
        let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !taken {
            bail!(
                "another `metaorch batch` is writing {}; wait for it to end, or write to another file",
                path.display()
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (file, path);
    Ok(())
}

/// Appends result lines: each written whole in one call as it comes (so a crash
/// loses at most the line being written), synced on [`Writer::sync`].
#[derive(Debug)]
pub struct Writer {
    file: File,
    path: PathBuf,
    dirty: bool,
}

impl Writer {
    /// Opens (creates) the output for appending, and locks it: two batches writing
    /// one file would both run the same ids.
    pub fn open(path: &Path) -> anyhow::Result<Writer> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("cannot open the output {}", path.display()))?;
        lock(&file, path)?;
        if !existed {
            let _ = sync_dir(path);
        }
        Ok(Writer {
            file,
            path: path.to_owned(),
            dirty: false,
        })
    }

    /// Writes one line (ending in `\n`).
    pub fn write(&mut self, line: &[u8]) -> anyhow::Result<()> {
        self.dirty = true;
        self.file
            .write_all(line)
            .with_context(|| format!("cannot write to {}", self.path.display()))
    }

    /// A handle to sync in the background, when something was written since the last.
    pub fn take_dirty(&mut self) -> Option<File> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        self.file.try_clone().ok()
    }

    /// Syncs what was written to disk.
    pub fn sync(&mut self) -> anyhow::Result<()> {
        self.dirty = false;
        self.file
            .sync_data()
            .with_context(|| format!("cannot sync {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, ok: bool) -> String {
        format!(
            "{{\"id\":\"{id}\",\"query\":\"q\",\"response\":{{\"ok\":{ok},\"answer\":\"a\"}}}}\n"
        )
    }

    #[test]
    fn a_half_written_last_line_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let whole = format!("{}{}", line("a", true), line("b", false));
        std::fs::write(&path, format!("{whole}{{\"id\":\"c\",\"que")).unwrap();
        let previous = scan(&path).unwrap();
        assert_eq!(previous.repaired, Some(14));
        assert_eq!(previous.results.len(), 2);
        assert!(!previous.results["b"]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), whole);
        // A whole line without its newline is cut off too: it was being written.
        std::fs::write(&path, format!("{whole}{}", line("c", true).trim_end())).unwrap();
        assert!(scan(&path).unwrap().repaired.is_some());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), whole);
    }

    #[test]
    fn a_whole_last_line_that_is_not_a_result_stops_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, "my notes\n").unwrap();
        assert!(scan(&path).unwrap_err().to_string().contains("line 1 of"));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "my notes\n",
            "untouched"
        );
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let _first = Writer::open(&path).unwrap();
        let second = Writer::open(&path).unwrap_err().to_string();
        assert!(
            second.contains("another `metaorch batch` is writing"),
            "{second}"
        );
    }

    #[test]
    fn a_broken_line_in_the_middle_stops_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(
            &path,
            format!("{}garbage\n{}", line("a", true), line("b", true)),
        )
        .unwrap();
        let err = scan(&path).unwrap_err().to_string();
        assert!(err.contains("line 2 of"), "{err}");
    }

    #[test]
    fn no_output_yet_is_nothing_done() {
        let dir = tempfile::tempdir().unwrap();
        assert!(scan(&dir.path().join("none")).unwrap().results.is_empty());
    }

    #[test]
    fn failed_results_are_removed_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(
            &path,
            format!(
                "{}{}{}",
                line("a", true),
                line("b", false),
                line("c", false)
            ),
        )
        .unwrap();
        remove(&path, &HashSet::from(["b".to_owned()])).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}{}", line("a", true), line("c", false))
        );
        assert!(!sibling(&path, ".retry.tmp").exists());
    }
}
