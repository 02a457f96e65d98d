//! Tailer behaviour on plain files: partial lines, rotation, truncation,
//! resuming.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use accesslog::{Mode, Offset, Tailer};
use common::TempDir;

fn append(path: &Path, text: &str) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

#[test]
fn partial_lines_are_held_until_complete() {
    let dir = TempDir::new("partial");
    let log = dir.join("a.log");
    append(&log, "one\ntw");
    let mut t = Tailer::open(&log, Mode::Parse, None).unwrap();
    assert_eq!(t.poll().unwrap(), ["one"]);
    assert_eq!(t.offset().unwrap().pos, 4);
    assert!(t.poll().unwrap().is_empty());
    append(&log, "o\nthree\n\nfo");
    assert_eq!(t.poll().unwrap(), ["two", "three", ""]);
    append(&log, "ur\n");
    assert_eq!(t.poll().unwrap(), ["four"]);
    assert_eq!(t.stats().lines, 5);
    assert_eq!(t.offset().unwrap().pos, fs::metadata(&log).unwrap().len());
}

#[test]
fn serve_mode_skips_existing_lines_and_a_partial_one() {
    let dir = TempDir::new("serve");
    let log = dir.join("a.log");
    append(&log, "old\nold-partial");
    let mut t = Tailer::open(&log, Mode::Serve, None).unwrap();
    assert!(t.poll().unwrap().is_empty());
    append(&log, "-rest\nnew\n");
    assert_eq!(t.poll().unwrap(), ["new"]);

    let log2 = dir.join("b.log");
    append(&log2, "old\n");
    let mut t = Tailer::open(&log2, Mode::Serve, None).unwrap();
    append(&log2, "new\n");
    assert_eq!(t.poll().unwrap(), ["new"]);
}

#[test]
fn missing_file_is_waited_for() {
    let dir = TempDir::new("missing");
    let log = dir.join("a.log");
    let mut t = Tailer::open(&log, Mode::Serve, None).unwrap();
    assert!(t.offset().is_none());
    assert!(t.poll().unwrap().is_empty());
    append(&log, "first\n");
    assert_eq!(t.poll().unwrap(), ["first"]);
}

#[test]
fn rename_and_create_finishes_the_old_file_first() {
    let dir = TempDir::new("rename");
    let log = dir.join("a.log");
    append(&log, "1\n");
    let mut t = Tailer::open(&log, Mode::Parse, None).unwrap();
    t.set_rotate_grace(Duration::from_millis(200));
    assert_eq!(t.poll().unwrap(), ["1"]);

    // The writer keeps its descriptor on the renamed file for a while.
    let mut old_writer = OpenOptions::new().append(true).open(&log).unwrap();
    fs::rename(&log, dir.join("a.log.1")).unwrap();
    old_writer.write_all(b"2\n3").unwrap();
    assert_eq!(t.poll().unwrap(), ["2"]);
    // Reopen: a new file appears, the old one gets its last bytes.
    append(&log, "4\n");
    old_writer.write_all(b"\n").unwrap();
    assert_eq!(t.poll().unwrap(), ["3", "4"]);
    assert_eq!(t.stats().rotations, 1);
    // Late writes to the old file are still picked up during the grace.
    old_writer.write_all(b"5\n").unwrap();
    append(&log, "6\n");
    assert_eq!(t.poll().unwrap(), ["5", "6"]);
    std::thread::sleep(Duration::from_millis(250));
    assert!(t.poll().unwrap().is_empty());
    // After the grace the old file is closed.
    old_writer.write_all(b"lost\n").unwrap();
    append(&log, "7\n");
    assert_eq!(t.poll().unwrap(), ["7"]);
    let cur = fs::metadata(&log).unwrap();
    assert_eq!(t.offset().unwrap().pos, cur.len());
}

#[test]
fn copytruncate_restarts_at_zero() {
    let dir = TempDir::new("truncate");
    let log = dir.join("a.log");
    append(&log, "aaaa\nbbbb\n");
    let mut t = Tailer::open(&log, Mode::Parse, None).unwrap();
    assert_eq!(t.poll().unwrap(), ["aaaa", "bbbb"]);
    fs::copy(&log, dir.join("a.log.1")).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&log, "c\n");
    assert_eq!(t.poll().unwrap(), ["c"]);
    assert_eq!(t.stats().truncations, 1);
    assert_eq!(t.stats().rotations, 0);
}

#[test]
fn resume_from_offset() {
    let dir = TempDir::new("resume");
    let log = dir.join("a.log");
    append(&log, "1\n2\n");
    let mut t = Tailer::open(&log, Mode::Parse, None).unwrap();
    assert_eq!(t.poll().unwrap(), ["1", "2"]);
    let saved: Offset = t.offset().unwrap().to_string().parse().unwrap();
    drop(t);
    append(&log, "3\n");
    // The offset wins over the mode, whichever it is.
    for mode in [Mode::Parse, Mode::Serve] {
        let mut t = Tailer::open(&log, mode, Some(saved)).unwrap();
        assert_eq!(t.poll().unwrap(), ["3"], "{mode:?}");
    }
}

#[test]
fn resume_after_rotation_while_stopped() {
    let dir = TempDir::new("resume-rotated");
    let log = dir.join("a.log");
    append(&log, "1\n");
    let mut t = Tailer::open(&log, Mode::Parse, None).unwrap();
    assert_eq!(t.poll().unwrap(), ["1"]);
    let saved = t.offset().unwrap();
    drop(t);
    append(&log, "2\n");
    fs::rename(&log, dir.join("a.log.1")).unwrap();
    append(&log, "3\n");
    let mut t = Tailer::open(&log, Mode::Serve, Some(saved)).unwrap();
    assert_eq!(t.poll().unwrap(), ["2", "3"]);

    // Without the rotated file next to it, the new file is read whole.
    let saved = t.offset().unwrap();
    drop(t);
    fs::rename(&log, dir.join("elsewhere")).unwrap();
    append(&log, "4\n");
    let mut t = Tailer::open(&log, Mode::Serve, Some(saved)).unwrap();
    assert_eq!(t.poll().unwrap(), ["4"]);
}

#[test]
fn resume_on_truncated_file_starts_over() {
    let dir = TempDir::new("resume-truncated");
    let log = dir.join("a.log");
    append(&log, "1111\n2222\n");
    let mut t = Tailer::open(&log, Mode::Parse, None).unwrap();
    t.poll().unwrap();
    let saved = t.offset().unwrap();
    drop(t);
    OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&log, "3\n");
    let mut t = Tailer::open(&log, Mode::Serve, Some(saved)).unwrap();
    assert_eq!(t.poll().unwrap(), ["3"]);
}

#[test]
fn overlong_lines_are_dropped_and_non_utf8_replaced() {
    let dir = TempDir::new("overlong");
    let log = dir.join("a.log");
    let long = "x".repeat(Tailer::MAX_LINE + 10);
    append(&log, &format!("a\n{long}"));
    let mut t = Tailer::open(&log, Mode::Parse, None).unwrap();
    assert_eq!(t.poll().unwrap(), ["a"]);
    append(&log, "tail-of-long\nb\n");
    assert_eq!(t.poll().unwrap(), ["b"]);
    assert_eq!(t.stats().overlong, 1);
    let mut f = OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(b"bad \xff byte\n").unwrap();
    assert_eq!(t.poll().unwrap(), ["bad \u{FFFD} byte"]);
}

#[test]
fn many_lines_across_buffer_boundaries() {
    let dir = TempDir::new("many");
    let log = dir.join("a.log");
    let lines: Vec<String> = (0..20_000)
        .map(|i| format!("line {i} {}", "y".repeat(i % 97)))
        .collect();
    append(&log, &(lines.join("\n") + "\n"));
    let mut t = Tailer::open(&log, Mode::Parse, None).unwrap();
    let mut got = Vec::new();
    assert_eq!(
        t.poll_with(|l| got.push(l.to_string())).unwrap(),
        lines.len()
    );
    assert_eq!(got, lines);
}

#[test]
fn poll_while_stops_before_a_refused_line() {
    let dir = TempDir::new("poll-while");
    let log = dir.join("a.log");
    append(&log, "one\ntwo\nthree\nfour\nfive");
    let mut t = Tailer::open(&log, Mode::Parse, None).unwrap();
    let mut took = Vec::new();
    let n = t
        .poll_while(|l| {
            if took.len() == 2 {
                return false;
            }
            took.push(l.to_string());
            true
        })
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(took, ["one", "two"]);
    // The offset covers exactly the lines taken.
    assert_eq!(t.offset().unwrap().pos, 8);
    // A restart from it hands out the refused line first ...
    let saved = t.offset().unwrap();
    let mut again = Tailer::open(&log, Mode::Serve, Some(saved)).unwrap();
    assert_eq!(again.poll().unwrap(), ["three", "four"]);
    // ... and so does the same tailer's next poll, partial line held.
    assert_eq!(t.poll().unwrap(), ["three", "four"]);
    append(&log, "\n");
    assert_eq!(t.poll().unwrap(), ["five"]);
    assert_eq!(t.stats().lines, 5);
}

#[test]
fn poll_while_stops_in_a_rotated_file_without_losing_either() {
    let dir = TempDir::new("poll-while-rotated");
    let log = dir.join("a.log");
    append(&log, "1\n");
    let mut t = Tailer::open(&log, Mode::Parse, None).unwrap();
    assert_eq!(t.poll().unwrap(), ["1"]);
    append(&log, "2\n3\n");
    fs::rename(&log, dir.join("a.log.1")).unwrap();
    append(&log, "4\n");
    // Rotation noticed: the old file's rest, then the new file.
    let mut seen = Vec::new();
    let mut budget = 1;
    loop {
        let n = t
            .poll_while(|l| {
                if budget == 0 {
                    return false;
                }
                budget -= 1;
                seen.push(l.to_string());
                true
            })
            .unwrap();
        if n == 0 && budget > 0 {
            break;
        }
        budget = 1;
    }
    assert_eq!(seen, ["2", "3", "4"]);
}

#[test]
fn a_saved_offset_that_does_not_fit_is_ignored() {
    let dir = TempDir::new("foreign-offset");
    let log = dir.join("a.log");
    append(&log, "1\n2\n");
    let meta = fs::metadata(&log).unwrap();
    use std::os::unix::fs::MetadataExt;
    // Another file's identity (no `a.log.1` holds it): this file came
    // after a rotation, so all of it is new, whatever the mode.
    let foreign = Offset {
        dev: meta.dev(),
        inode: meta.ino() + 1_000_000,
        pos: 2,
    };
    let mut t = Tailer::open(&log, Mode::Serve, Some(foreign)).unwrap();
    assert_eq!(t.poll().unwrap(), ["1", "2"]);
    // The same file, but the offset is past its end (truncated while
    // stopped): read from its start.
    let beyond = Offset {
        dev: meta.dev(),
        inode: meta.ino(),
        pos: meta.len() + 100,
    };
    let mut t = Tailer::open(&log, Mode::Serve, Some(beyond)).unwrap();
    assert_eq!(t.poll().unwrap(), ["1", "2"]);
    // A rotated-away file whose identity matches but that is shorter than
    // the offset is not resumed either.
    fs::rename(&log, dir.join("a.log.1")).unwrap();
    append(&log, "3\n");
    let mut t = Tailer::open(&log, Mode::Serve, Some(beyond)).unwrap();
    assert_eq!(t.poll().unwrap(), ["3"]);
}
