//! The store on real files: records survive reopening and `kill -9`; a
//! damaged, foreign, newer or locked store is refused with its path and
//! left untouched.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use store::{Ban, Embedded, HealthRecord, KeyRecord, LogOffset, RuntimeRule, Store, StoreError};

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "store-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).expect("mkdir");
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ban(i: u32) -> Ban {
    Ban {
        set: "clients".into(),
        network: format!("198.51.100.{}/32", i % 256),
        until_unix_ms: 1_900_000_000_000 + u64::from(i),
        times: i,
        reason: format!("test {i}"),
    }
}

/// The same behaviour from both backends.
fn exercise(s: &Store) {
    assert!(s.bans().unwrap().is_empty());
    s.put_ban(&ban(2)).unwrap();
    s.put_ban(&ban(1)).unwrap();
    let mut b2 = ban(2);
    b2.times = 7;
    s.put_ban(&b2).unwrap(); // replaces
    let bans = s.bans().unwrap();
    assert_eq!(
        bans,
        vec![ban(1), b2],
        "sorted by network, replaced in place"
    );
    assert!(
        !s.remove_ban("other", "198.51.100.1/32").unwrap(),
        "sets apart"
    );
    assert!(s.remove_ban("clients", "198.51.100.1/32").unwrap());
    assert!(!s.remove_ban("clients", "198.51.100.1/32").unwrap());
    assert_eq!(s.bans().unwrap().len(), 1);

    let r = RuntimeRule {
        set: "clients".into(),
        list: "deny".into(),
        rule: "10.0.0.0/8".into(),
        until_unix_ms: None,
    };
    s.put_rule(&r).unwrap();
    assert_eq!(s.rules().unwrap(), vec![r.clone()]);
    assert!(s.remove_rule(&r).unwrap());
    assert!(s.rules().unwrap().is_empty());

    let k = KeyRecord {
        id: "agent-1".into(),
        public_key: "ed25519:AAAA".into(),
        revoked: false,
        added_unix_ms: 1,
    };
    s.put_key(&k).unwrap();
    assert_eq!(s.keys().unwrap(), vec![k]);

    assert_eq!(s.offset("web").unwrap(), None);
    let o = LogOffset {
        monitor: "web".into(),
        file_id: "2049:1234".into(),
        offset: 4096,
        path: Some("/var/log/nginx/access.log".into()),
    };
    s.put_offset(&o).unwrap();
    assert_eq!(s.offset("web").unwrap(), Some(o));

    assert!(s.benches().unwrap().is_empty());
    let bench = |pool: &str, address: &str, strike: u32| HealthRecord {
        pool: pool.into(),
        address: address.into(),
        since_unix_ms: 1_800_000_000_000,
        until_unix_ms: 1_800_000_600_000,
        strike,
        cause: "consecutive_failures:3".into(),
    };
    s.put_bench(&bench("web", "192.0.2.2", 1)).unwrap();
    s.put_bench(&bench("web", "192.0.2.1", 1)).unwrap();
    s.put_bench(&bench("api", "192.0.2.1", 1)).unwrap();
    s.put_bench(&bench("web", "192.0.2.2", 2)).unwrap(); // replaces
    assert_eq!(
        s.benches().unwrap(),
        vec![
            bench("api", "192.0.2.1", 1),
            bench("web", "192.0.2.1", 1),
            bench("web", "192.0.2.2", 2)
        ]
    );
    assert_eq!(s.benches_of("web").unwrap().len(), 2);
    assert!(s.remove_bench("web", "192.0.2.1").unwrap());
    assert!(!s.remove_bench("web", "192.0.2.1").unwrap());
    assert_eq!(
        s.benches_of("web").unwrap(),
        vec![bench("web", "192.0.2.2", 2)]
    );
    assert_eq!(s.benches_of("api").unwrap().len(), 1, "pools apart");

    let hold = |ingress: &str, backend: &str| store::Hold {
        ingress: ingress.into(),
        backend: backend.into(),
    };
    s.put_hold(&hold("web", "site-2")).unwrap();
    s.put_hold(&hold("web", "site-1")).unwrap();
    s.put_hold(&hold("web", "site-1")).unwrap(); // idempotent
    s.put_hold(&hold("api", "site-1")).unwrap();
    assert!(s.remove_hold(&hold("api", "site-1")).unwrap());
    assert!(!s.remove_hold(&hold("api", "site-1")).unwrap());
    assert_eq!(
        s.holds().unwrap(),
        vec![hold("web", "site-1"), hold("web", "site-2")]
    );
}

#[test]
fn memory_backend() {
    exercise(&Store::memory());
}

#[test]
fn embedded_backend_survives_reopening() {
    let dir = TempDir::new();
    let s = Store::open_dir(&dir.0).unwrap();
    exercise(&s);
    drop(s);
    let s = Store::open_dir(&dir.0).unwrap();
    assert_eq!(s.bans().unwrap()[0].times, 7);
    assert_eq!(s.keys().unwrap().len(), 1);
    assert_eq!(s.offset("web").unwrap().map(|o| o.offset), Some(4096));
    assert_eq!(s.benches().unwrap().len(), 2);
    assert_eq!(s.holds().unwrap().len(), 2);
}

#[test]
fn a_foreign_file_is_refused_and_left_alone() {
    let dir = TempDir::new();
    let path = dir.0.join(store::FILE_NAME);
    let text = b"this is not a redb file, it is someone's notes\n".repeat(200);
    std::fs::write(&path, &text).unwrap();
    let e = Store::open_dir(&dir.0).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    assert!(e.to_string().contains("Nothing was changed"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), text, "file untouched");
}

#[test]
fn a_damaged_store_is_refused_and_left_alone() {
    let dir = TempDir::new();
    let s = Store::open_dir(&dir.0).unwrap();
    for i in 0..50 {
        s.put_ban(&ban(i)).unwrap();
    }
    drop(s);
    let path = dir.0.join(store::FILE_NAME);
    let mut bytes = std::fs::read(&path).unwrap();
    // Wreck the header (magic number and both commit slots).
    for b in bytes.iter_mut().take(512) {
        *b ^= 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    let e = Store::open_dir(&dir.0).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "file untouched");
}

#[test]
fn a_newer_format_is_refused() {
    let dir = TempDir::new();
    let path = dir.0.join(store::FILE_NAME);
    drop(Embedded::open(&path).unwrap());
    {
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut meta = tx
                .open_table(redb::TableDefinition::<&str, u32>::new("meta"))
                .unwrap();
            meta.insert("format", store::FORMAT_VERSION + 1).unwrap();
        }
        tx.commit().unwrap();
    }
    let e = Store::open_dir(&dir.0).unwrap_err();
    match &e {
        StoreError::NewerFormat {
            found, supported, ..
        } => {
            assert_eq!(
                (*found, *supported),
                (store::FORMAT_VERSION + 1, store::FORMAT_VERSION)
            );
        }
        other => panic!("expected NewerFormat, got {other}"),
    }
    assert!(e.to_string().contains("newer ippool"), "{e}");
}

#[test]
fn a_store_open_elsewhere_is_refused() {
    let dir = TempDir::new();
    let _first = Store::open_dir(&dir.0).unwrap();
    let e = Store::open_dir(&dir.0).unwrap_err();
    assert!(matches!(e, StoreError::Locked { .. }), "{e}");
}

/// A child process writes bans and acknowledges each one on a pipe only
/// after `put_ban` returned; it is killed with SIGKILL at a random point.
/// Every acknowledged ban must be in the store afterwards.
#[test]
fn kill_9_loses_nothing_acknowledged() {
    for round in 0..5u32 {
        let dir = TempDir::new();
        let acked = write_until_killed(&dir.0, 20 + round * 17);
        assert!(acked >= 20 + round * 17, "child acknowledged {acked}");
        let s = Store::open_dir(&dir.0).expect("reopen after kill -9");
        let bans = s.bans().unwrap();
        let have: std::collections::HashSet<u32> = bans.iter().map(|b| b.times).collect();
        for i in 0..acked {
            assert!(
                have.contains(&i),
                "round {round}: acknowledged ban {i} lost"
            );
        }
    }
}

/// Forks a writer, reads `at_least` acknowledgements (then a few more, so
/// the kill lands mid-write), SIGKILLs it; returns how many were acked.
fn write_until_killed(dir: &Path, at_least: u32) -> u32 {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (rd, wr) = (fds[0], fds[1]);
    // SAFETY: the child only opens the store, writes and calls write(2);
    // it never returns into the test harness (it is killed, or _exits).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: closing our copy of the read end.
        unsafe { libc::close(rd) };
        let code = match Store::open_dir(dir) {
            Ok(s) => {
                let mut i = 0u32;
                loop {
                    let mut b = ban(i);
                    b.network = format!("ban-{i}");
                    if s.put_ban(&b).is_err() {
                        break 2;
                    }
                    let n = i.to_le_bytes();
                    // SAFETY: writing 4 bytes from a live buffer.
                    if unsafe { libc::write(wr, n.as_ptr().cast(), 4) } != 4 {
                        break 3;
                    }
                    i += 1;
                }
            }
            Err(_) => 1,
        };
        // SAFETY: leaving the child without running the harness.
        unsafe { libc::_exit(code) };
    }
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(wr) };
    let mut acked = 0u32;
    let extra = (std::process::id() % 7) + 1;
    let mut buf = [0u8; 4];
    while acked < at_least + extra {
        // SAFETY: reading into a live 4-byte buffer (pipe writes of 4
        // bytes are atomic).
        let n = unsafe { libc::read(rd, buf.as_mut_ptr().cast(), 4) };
        if n != 4 {
            break;
        }
        acked = u32::from_le_bytes(buf) + 1;
    }
    // SAFETY: signalling and reaping our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        libc::close(rd);
    }
    acked
}
