//! A polling log tailer that survives rotation and restarts.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use memchr::memchr;

/// Where a [`Tailer`] starts when it has no usable [`Offset`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// From the start of the current file: everything since the last
    /// rotation.
    Parse,
    /// From the end of the current file: new lines only.
    Serve,
}

/// A position in a log file that survives a restart: the file's identity
/// (device and inode) and the byte after the last complete line handed out.
///
/// Persist it with its `Display` form (`dev:inode:pos`) and read it back with
/// `FromStr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Offset {
    /// Device of the file (`st_dev`).
    pub dev: u64,
    /// Inode of the file (`st_ino`).
    pub inode: u64,
    /// Byte position.
    pub pos: u64,
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.dev, self.inode, self.pos)
    }
}

/// An [`Offset`] string that is not `dev:inode:pos`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid offset {0:?}: expected dev:inode:pos")]
pub struct OffsetParseError(String);

impl FromStr for Offset {
    type Err = OffsetParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || OffsetParseError(s.to_string());
        let mut it = s.trim().split(':').map(u64::from_str);
        match (it.next(), it.next(), it.next(), it.next()) {
            (Some(Ok(dev)), Some(Ok(inode)), Some(Ok(pos)), None) => Ok(Self { dev, inode, pos }),
            _ => Err(err()),
        }
    }
}

/// Counters of a [`Tailer`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TailStats {
    /// Complete lines handed out.
    pub lines: u64,
    /// Rotations seen (the path now names another file).
    pub rotations: u64,
    /// Truncations seen (the file shrank below the read position).
    pub truncations: u64,
    /// Lines longer than the line limit, dropped.
    pub overlong: u64,
}

/// One open file being read.
struct Source {
    file: File,
    dev: u64,
    inode: u64,
    /// Byte after the last complete line handed out.
    pos: u64,
    /// Byte after the last byte read (`pos` plus the held partial line).
    read_pos: u64,
    /// The partial last line, held until its newline arrives.
    partial: Vec<u8>,
    /// Discard everything up to the next newline (serve mode starting
    /// mid-line, or an overlong line).
    skipping: bool,
}

impl Source {
    fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        Ok(Self {
            file,
            dev: meta.dev(),
            inode: meta.ino(),
            pos: 0,
            read_pos: 0,
            partial: Vec::new(),
            skipping: false,
        })
    }

    fn seek(&mut self, pos: u64) {
        self.pos = pos;
        self.read_pos = pos;
        self.partial.clear();
    }

    fn offset(&self) -> Offset {
        Offset {
            dev: self.dev,
            inode: self.inode,
            pos: self.pos,
        }
    }

    /// Reads to end of file, handing out complete lines, until `f` refuses
    /// one (that line stays unread: the next drain starts with it).
    fn drain(
        &mut self,
        buf: &mut [u8],
        max_line: usize,
        stats: &mut TailStats,
        f: &mut dyn FnMut(&str) -> bool,
    ) -> io::Result<Drained> {
        // copytruncate: the file shrank under us; start over.
        if self.file.metadata()?.len() < self.read_pos {
            stats.truncations += 1;
            self.seek(0);
            self.skipping = false;
        }
        let mut any = false;
        loop {
            let n = match self.file.read_at(buf, self.read_pos) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(Drained {
                    any,
                    stopped: false,
                });
            }
            any = true;
            let chunk_start = self.read_pos;
            self.read_pos += n as u64;
            let chunk = &buf[..n];
            let mut s = 0;
            while let Some(k) = memchr(b'\n', &chunk[s..]) {
                let e = s + k;
                let skipping = std::mem::take(&mut self.skipping);
                if !skipping {
                    let taken = if self.partial.is_empty() {
                        emit(&chunk[s..e], f)
                    } else {
                        self.partial.extend_from_slice(&chunk[s..e]);
                        emit(&self.partial, f)
                    };
                    if !taken {
                        // `pos` is the start of this line: read it again
                        // next time.
                        self.partial.clear();
                        self.read_pos = self.pos;
                        return Ok(Drained { any, stopped: true });
                    }
                    stats.lines += 1;
                }
                self.partial.clear();
                s = e + 1;
                self.pos = chunk_start + s as u64;
            }
            if !self.skipping {
                self.partial.extend_from_slice(&chunk[s..]);
                if self.partial.len() > max_line {
                    stats.overlong += 1;
                    self.partial.clear();
                    self.skipping = true;
                }
            }
        }
    }
}

/// What a [`Source::drain`] did.
struct Drained {
    /// Whether any byte was read.
    any: bool,
    /// Whether the callback refused a line (the file was not read to its
    /// end).
    stopped: bool,
}

fn emit(line: &[u8], f: &mut dyn FnMut(&str) -> bool) -> bool {
    match std::str::from_utf8(line) {
        Ok(s) => f(s),
        Err(_) => f(&String::from_utf8_lossy(line)),
    }
}

/// Follows one log file by polling, across rotations and restarts.
///
/// * **rename + create** (logrotate's default, or `mv` then `nginx -s
///   reopen`): when the path names a new file (another inode), the old file
///   is read to its end first, then the new one from its start. The old file
///   stays open and keeps being drained for as long as it grows and for the
///   [rotate grace](Self::set_rotate_grace) after that, because nginx writes
///   to it until every worker has reopened its logs.
/// * **copytruncate**: when the file becomes shorter than what was read,
///   reading restarts at 0. Lines written between logrotate's copy and its
///   truncate are lost (to every reader); a file that is truncated and grows
///   past the old position between two polls is not noticed.
/// * **restart**: [`offset`](Self::offset) gives a position to persist;
///   [`Tailer::open`] with it resumes right after the last line handed out.
///   If the file was rotated meanwhile, the rest of the old file is read from
///   `<path>.1` when that is the same inode, then the new file from its start.
///   An offset for another file identity, or past the end of the file
///   (truncated meanwhile), is not applied. To stop mid-backlog and still
///   persist an exact offset, take lines with [`poll_while`](Self::poll_while).
/// * A missing file is waited for; when it appears it is read from its start.
/// * A partial last line is held until its newline arrives; lines longer
///   than 1 MiB are dropped and counted. Bytes that are not UTF-8 are
///   replaced with U+FFFD.
///
/// Two rotations between two polls lose the file in between. The tailer does
/// no I/O by itself: call [`poll`](Self::poll) (or
/// [`poll_with`](Self::poll_with)) every second or so, e.g. from
/// `tokio::task::spawn_blocking`.
pub struct Tailer {
    path: PathBuf,
    current: Option<Source>,
    /// The previous file after a rotation, and when it last grew.
    old: Option<(Source, Instant)>,
    grace: Duration,
    max_line: usize,
    buf: Box<[u8]>,
    stats: TailStats,
}

impl fmt::Debug for Tailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tailer")
            .field("path", &self.path)
            .field("offset", &self.offset())
            .field("stats", &self.stats)
            .finish()
    }
}

impl Tailer {
    /// Default [rotate grace](Self::set_rotate_grace).
    pub const DEFAULT_ROTATE_GRACE: Duration = Duration::from_secs(5);
    /// Longest line kept, in bytes.
    pub const MAX_LINE: usize = 1 << 20;

    /// Opens `path` for tailing. An `offset` from a previous run takes
    /// precedence over `mode` (see the type docs); `mode` applies when there
    /// is none. A missing file is not an error.
    pub fn open(path: impl AsRef<Path>, mode: Mode, offset: Option<Offset>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut t = Self {
            path,
            current: None,
            old: None,
            grace: Self::DEFAULT_ROTATE_GRACE,
            max_line: Self::MAX_LINE,
            buf: vec![0; 1 << 16].into_boxed_slice(),
            stats: TailStats::default(),
        };
        let mut current = match Source::open(&t.path) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        match (offset, current.as_mut()) {
            (Some(o), Some(cur)) if (o.dev, o.inode) == (cur.dev, cur.inode) => {
                // Same file: resume, unless it was truncated meanwhile.
                if o.pos <= cur.file.metadata()?.len() {
                    cur.seek(o.pos);
                }
            }
            (Some(o), _) => {
                // Rotated while we were away: finish the old file if it is
                // still next to the new one; the new file is read from 0.
                let mut rotated = t.path.clone().into_os_string();
                rotated.push(".1");
                if let Ok(mut old) = Source::open(Path::new(&rotated))
                    && (old.dev, old.inode) == (o.dev, o.inode)
                    && o.pos <= old.file.metadata()?.len()
                {
                    old.seek(o.pos);
                    t.old = Some((old, Instant::now()));
                }
            }
            (None, Some(cur)) if mode == Mode::Serve => {
                let len = cur.file.metadata()?.len();
                cur.seek(len);
                if len > 0 {
                    let mut last = [0u8];
                    cur.file.read_exact_at(&mut last, len - 1)?;
                    // Started mid-line: skip the rest of that line.
                    cur.skipping = last[0] != b'\n';
                }
            }
            (None, _) => {}
        }
        t.current = current;
        Ok(t)
    }

    /// How long a rotated-away file keeps being read after it last grew
    /// (default 5 s).
    pub fn set_rotate_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// The path being followed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counters.
    pub fn stats(&self) -> TailStats {
        self.stats
    }

    /// Where to resume after a restart: right after the last complete line
    /// handed out from the current file (`None` before any file was opened).
    /// Lines of a rotated-away file still being drained are not covered.
    pub fn offset(&self) -> Option<Offset> {
        self.current
            .as_ref()
            .or(self.old.as_ref().map(|(s, _)| s))
            .map(Source::offset)
    }

    /// Reads every complete line that is available now. Holds all of them in
    /// memory: prefer [`poll_with`](Self::poll_with) for a large backlog.
    pub fn poll(&mut self) -> io::Result<Vec<String>> {
        let mut lines = Vec::new();
        self.poll_with(|l| lines.push(l.to_string()))?;
        Ok(lines)
    }

    /// Hands every complete line that is available now (without its `\n`) to
    /// `f`, in file order, and returns how many there were.
    pub fn poll_with(&mut self, mut f: impl FnMut(&str)) -> io::Result<usize> {
        self.poll_while(|line| {
            f(line);
            true
        })
    }

    /// Like [`poll_with`](Self::poll_with), but `f` may refuse a line by
    /// returning `false`: the poll stops there and that line is not
    /// consumed. The next poll hands it out again, and
    /// [`offset`](Self::offset) stays right before it, so a caller can stop
    /// mid-backlog (shutdown, a bound on the work per poll) and persist an
    /// offset that covers exactly the lines it took. Returns how many lines
    /// `f` took.
    pub fn poll_while(&mut self, mut f: impl FnMut(&str) -> bool) -> io::Result<usize> {
        let before = self.stats.lines;
        let (buf, max_line, stats) = (&mut self.buf, self.max_line, &mut self.stats);
        // 1. The rotated-away file, while nginx may still write to it.
        if let Some((old, last_growth)) = &mut self.old {
            let d = old.drain(buf, max_line, stats, &mut f)?;
            if d.any {
                *last_growth = Instant::now();
            } else if last_growth.elapsed() >= self.grace {
                self.old = None;
            }
            if d.stopped {
                return Ok((self.stats.lines - before) as usize);
            }
        }
        // 2. The current file, to its end.
        if let Some(cur) = &mut self.current
            && cur.drain(buf, max_line, stats, &mut f)?.stopped
        {
            return Ok((self.stats.lines - before) as usize);
        }
        // 3. Has the path moved on to another file?
        match fs::metadata(&self.path) {
            Ok(meta) => {
                let moved = self
                    .current
                    .as_ref()
                    .is_none_or(|c| (c.dev, c.inode) != (meta.dev(), meta.ino()));
                if moved {
                    let mut new = match Source::open(&self.path) {
                        Ok(s) => s,
                        // Rotated again between stat and open: next poll.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            return Ok((self.stats.lines - before) as usize);
                        }
                        Err(e) => return Err(e),
                    };
                    if let Some(prev) = self.current.take() {
                        self.stats.rotations += 1;
                        self.old = Some((prev, Instant::now()));
                    }
                    new.drain(buf, max_line, &mut self.stats, &mut f)?;
                    self.current = Some(new);
                }
            }
            // Renamed away and not yet recreated: keep reading the open file.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok((self.stats.lines - before) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_round_trips() {
        let o = Offset {
            dev: 2049,
            inode: 123,
            pos: 456,
        };
        assert_eq!(o.to_string().parse::<Offset>(), Ok(o));
        assert!("1:2".parse::<Offset>().is_err());
        assert!("1:2:3:4".parse::<Offset>().is_err());
        assert!("a:2:3".parse::<Offset>().is_err());
    }
}
