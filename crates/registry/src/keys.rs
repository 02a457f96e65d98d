//! The key store: agent and admin public keys in a directory, one file per id.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::Rng;

/// Longest key id, in bytes.
const MAX_ID_LEN: usize = 64;
/// Extension of public key files.
const PUB_EXT: &str = "pub";
/// Extension of private key files written by [`generate_keypair`].
const KEY_EXT: &str = "key";
/// Subdirectory holding revoked public key files.
const REVOKED_DIR: &str = "revoked";

/// Errors of the key store and key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// An id that does not match `^[a-z0-9][a-z0-9._-]{0,63}$` or contains `..`.
    #[error(
        "invalid key id `{0}`: expected 1-64 characters of a-z 0-9 . _ -, starting with a letter or digit, without `..`"
    )]
    InvalidId(String),
    /// A key file that does not parse.
    #[error("{}:{line}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The 1-based line (0 when the problem is the file as a whole).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A key with this id already exists (keys are never overwritten).
    #[error("{}: a key with this id already exists", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// No active key with this id.
    #[error("no active key with id `{0}`")]
    NotFound(KeyId),
    /// A private key file that others may read.
    #[error(
        "{}: private key is readable by group or others (mode {mode:o}); run `chmod 600` on it",
        path.display()
    )]
    Permissions {
        /// The private key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A validated key id: 1 to 64 characters of `a-z 0-9 . _ -`, starting with
/// a letter or a digit, never containing `..`.
///
/// Ids name files in the key store (`<id>.pub`), so the rule keeps them from
/// ever naming a path outside it.
///
/// ```
/// use registry::KeyId;
/// assert!("web-001".parse::<KeyId>().is_ok());
/// assert!("../etc/passwd".parse::<KeyId>().is_err());
/// assert!("a..b".parse::<KeyId>().is_err());
/// assert!("Web".parse::<KeyId>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct KeyId(String);

impl KeyId {
    /// Validates `id`.
    pub fn new(id: impl Into<String>) -> Result<KeyId, KeyError> {
        let id = id.into();
        if is_valid_name(&id, false) {
            Ok(KeyId(id))
        } else {
            Err(KeyError::InvalidId(id))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The naming rule shared by key ids and service names (`mixed_case` also
/// admits upper-case letters, for custom message types and actions).
pub(crate) fn is_valid_name(s: &str, mixed_case: bool) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > MAX_ID_LEN || s.contains("..") {
        return false;
    }
    let alnum = |c: u8| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || (mixed_case && c.is_ascii_uppercase())
    };
    alnum(b[0])
        && b[1..]
            .iter()
            .all(|&c| alnum(c) || matches!(c, b'.' | b'_' | b'-'))
}

impl FromStr for KeyId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<KeyId, KeyError> {
        KeyId::new(s)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl AsRef<str> for KeyId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// What a key may do. Roles are separate: an admin key cannot register
/// services and an agent key cannot manage keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Registers services for itself, at addresses its key allows.
    Agent,
    /// Adds and revokes keys.
    Admin,
}

impl Role {
    /// `"agent"` or `"admin"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "agent" => Ok(Role::Agent),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role `{other}`: expected `agent` or `admin`"
            )),
        }
    }
}

/// One entry of an agent key's address policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allow {
    /// The address the agent connects from (`peer` in a key file).
    Peer,
    /// An address, range or subnet (`10.0.0.7`, `10.0.0.0/8`, `10.0.0.1-10.0.0.9`).
    Rule(iprules::Rule),
}

impl fmt::Display for Allow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allow::Peer => f.write_str("peer"),
            Allow::Rule(r) => fmt::Display::fmt(r, f),
        }
    }
}

impl FromStr for Allow {
    type Err = iprules::RuleError;
    fn from_str(s: &str) -> Result<Allow, iprules::RuleError> {
        if s == "peer" {
            Ok(Allow::Peer)
        } else {
            s.parse().map(Allow::Rule)
        }
    }
}

/// One public key of the store: its id, key, role and (for agents) the
/// service addresses it may register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    /// The key id (the file is `<id>.pub`).
    pub id: KeyId,
    /// The Ed25519 public key.
    pub public_key: VerifyingKey,
    /// What the key may do.
    pub role: Role,
    /// Addresses an agent key may register services at. Empty means
    /// `[Allow::Peer]`: only the address the agent connects from.
    pub allow: Vec<Allow>,
}

impl KeyEntry {
    /// Whether an agent connected from `peer` may register a service at `addr`.
    /// Always false for admin keys.
    pub fn allows(&self, addr: IpAddr, peer: IpAddr) -> bool {
        if self.role != Role::Agent {
            return false;
        }
        let addr = addr.to_canonical();
        let is_peer = addr == peer.to_canonical();
        if self.allow.is_empty() {
            return is_peer;
        }
        self.allow.iter().any(|a| match a {
            Allow::Peer => is_peer,
            Allow::Rule(r) => r.contains(addr),
        })
    }

    /// Decodes a public key in the text form key files and the `key.add`
    /// message carry (base64 of the 32 key bytes); the error says what is
    /// wrong with it.
    pub fn decode_public_key(text: &str) -> Result<VerifyingKey, String> {
        parse_public_key(text)
    }

    /// The public key in that text form.
    pub fn public_key_text(&self) -> String {
        encode_public_key(&self.public_key)
    }

    /// The entry in the key file format (see the crate documentation).
    pub fn to_file_string(&self) -> String {
        let mut s = format!(
            "# ippool registry key `{}`\ned25519 {}\nrole {}\n",
            self.id,
            B64.encode(self.public_key.as_bytes()),
            self.role
        );
        if !self.allow.is_empty() {
            let list: Vec<String> = self.allow.iter().map(ToString::to_string).collect();
            s.push_str(&format!("allow {}\n", list.join(", ")));
        }
        s
    }

    /// Parses a key file's text; `path` names the file in errors and its
    /// stem (`<id>.pub`) gives the id.
    pub fn parse(path: &Path, text: &str) -> Result<KeyEntry, KeyError> {
        let id = id_from_path(path, PUB_EXT)?;
        let err = |line: usize, message: String| KeyError::Parse {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut public_key = None;
        let mut role = None;
        let mut allow = Vec::new();
        let mut allow_line = 0;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match word {
                "ed25519" => {
                    if public_key.is_some() {
                        return Err(err(n, "a second `ed25519` line".into()));
                    }
                    public_key = Some(parse_public_key(rest).map_err(|m| err(n, m))?);
                }
                "role" => {
                    if role.is_some() {
                        return Err(err(n, "a second `role` line".into()));
                    }
                    role = Some(rest.parse::<Role>().map_err(|m| err(n, m))?);
                }
                "allow" => {
                    allow_line = n;
                    let items = rest.split([',', ' ', '\t']).filter(|s| !s.is_empty());
                    let mut any = false;
                    for item in items {
                        any = true;
                        let a = item
                            .parse::<Allow>()
                            .map_err(|e| err(n, format!("allow `{item}`: {e}")))?;
                        if !allow.contains(&a) {
                            allow.push(a);
                        }
                    }
                    if !any {
                        return Err(err(
                            n,
                            "`allow` needs `peer` or addresses, ranges, subnets".into(),
                        ));
                    }
                }
                other => {
                    return Err(err(
                        n,
                        format!("unknown keyword `{other}`: expected `ed25519`, `role` or `allow`"),
                    ));
                }
            }
        }
        let public_key =
            public_key.ok_or_else(|| err(0, "no `ed25519 <base64 public key>` line".into()))?;
        let role = role.ok_or_else(|| {
            err(
                0,
                "no `role agent|admin` line (roles are never implied)".into(),
            )
        })?;
        if role == Role::Admin && !allow.is_empty() {
            return Err(err(allow_line, "`allow` applies to agent keys only".into()));
        }
        Ok(KeyEntry {
            id,
            public_key,
            role,
            allow,
        })
    }
}

/// Decodes a base64 Ed25519 public key (32 bytes).
pub(crate) fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = B64
        .decode(text.trim())
        .map_err(|e| format!("public key is not base64: {e}"))?;
    let bytes: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| format!("public key is {} bytes, expected 32", bytes.len()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| "not a valid Ed25519 public key".to_string())
}

/// Encodes a public key the way key files and the `key.add` message carry it.
pub(crate) fn encode_public_key(key: &VerifyingKey) -> String {
    B64.encode(key.as_bytes())
}

fn id_from_path(path: &Path, ext: &str) -> Result<KeyId, KeyError> {
    let bad = || KeyError::Parse {
        path: path.to_path_buf(),
        line: 0,
        message: format!("file name must be `<id>.{ext}` with a valid id"),
    };
    if path.extension().and_then(|e| e.to_str()) != Some(ext) {
        return Err(bad());
    }
    let stem = path.file_stem().and_then(|s| s.to_str()).ok_or_else(bad)?;
    KeyId::new(stem).map_err(|_| bad())
}

/// A directory of public keys: `<id>.pub` files for active keys and
/// `revoked/<id>.pub` for revoked ones. Other files are ignored, so the
/// directory may also hold the `<id>.key` private keys of local agents.
///
/// [`add`](KeyStore::add) writes a file atomically (temporary file, fsync,
/// rename); [`revoke`](KeyStore::revoke) moves it into `revoked/`; both
/// refuse to touch anything but `<valid id>.pub`.
#[derive(Clone, Debug)]
pub struct KeyStore {
    dir: PathBuf,
    keys: BTreeMap<KeyId, KeyEntry>,
    revoked: BTreeSet<KeyId>,
}

impl KeyStore {
    /// Loads the store in `dir` (which must exist). Fails on the first file
    /// that does not parse, naming it.
    pub fn open(dir: impl Into<PathBuf>) -> Result<KeyStore, KeyError> {
        let mut store = KeyStore {
            dir: dir.into(),
            keys: BTreeMap::new(),
            revoked: BTreeSet::new(),
        };
        store.reload()?;
        Ok(store)
    }

    /// Rescans the directory. On error the store is left unchanged.
    pub fn reload(&mut self) -> Result<(), KeyError> {
        let mut keys = BTreeMap::new();
        for path in pub_files(&self.dir)? {
            let text = fs::read_to_string(&path).map_err(io_err(&path))?;
            let entry = KeyEntry::parse(&path, &text)?;
            keys.insert(entry.id.clone(), entry);
        }
        let mut revoked = BTreeSet::new();
        let rdir = self.dir.join(REVOKED_DIR);
        if rdir.is_dir() {
            for path in pub_files(&rdir)? {
                revoked.insert(id_from_path(&path, PUB_EXT)?);
            }
        }
        self.keys = keys;
        self.revoked = revoked;
        Ok(())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The active key with this id.
    pub fn get(&self, id: &KeyId) -> Option<&KeyEntry> {
        self.keys.get(id)
    }

    /// Whether `id` was revoked and not added again since.
    pub fn is_revoked(&self, id: &KeyId) -> bool {
        !self.keys.contains_key(id) && self.revoked.contains(id)
    }

    /// The active keys, by id.
    pub fn iter(&self) -> impl Iterator<Item = &KeyEntry> {
        self.keys.values()
    }

    /// Writes `<id>.pub` for a new key. Refuses an id that already has an
    /// active key (revoke it first); a revoked id may be added again.
    pub fn add(&mut self, entry: KeyEntry) -> Result<(), KeyError> {
        let path = self.check_add(&entry.id)?;
        write_new(&path, &entry)?;
        self.added(entry);
        Ok(())
    }

    /// Moves `<id>.pub` to `revoked/<id>.pub` (replacing an earlier
    /// revocation of the same id). The id is refused from then on.
    pub fn revoke(&mut self, id: &KeyId) -> Result<(), KeyError> {
        self.check_revoke(id)?;
        move_to_revoked(&self.dir, id)?;
        self.revoked_now(id);
        sync_revoked(&self.dir)
    }

    // The steps of `add` and `revoke`, for a caller that keeps the store
    // behind a lock and does the file work (fsyncs) without holding it:
    // check (shared), file (no lock: the no-replace link and the rename
    // settle a race between two callers), record (exclusive).

    /// Where `id`'s new key file goes, if `id` has no active key.
    pub(crate) fn check_add(&self, id: &KeyId) -> Result<PathBuf, KeyError> {
        let path = self.dir.join(format!("{id}.{PUB_EXT}"));
        if self.keys.contains_key(id) {
            return Err(KeyError::Exists { path });
        }
        Ok(path)
    }

    /// Records a key whose file [`write_new`] wrote.
    pub(crate) fn added(&mut self, entry: KeyEntry) {
        self.keys.insert(entry.id.clone(), entry);
    }

    /// Whether `id` has an active key to revoke.
    pub(crate) fn check_revoke(&self, id: &KeyId) -> Result<(), KeyError> {
        if self.keys.contains_key(id) {
            Ok(())
        } else {
            Err(KeyError::NotFound(id.clone()))
        }
    }

    /// Records a revocation [`move_to_revoked`] made.
    pub(crate) fn revoked_now(&mut self, id: &KeyId) {
        self.keys.remove(id);
        self.revoked.insert(id.clone());
    }
}

/// Writes a new key's file at `path`. No replace: a file that appeared
/// meanwhile (copied in by hand, or another caller's) is refused by the
/// link itself, not overwritten.
pub(crate) fn write_new(path: &Path, entry: &KeyEntry) -> Result<(), KeyError> {
    write_atomic(path, entry.to_file_string().as_bytes(), 0o644, true)
}

/// Moves `dir/<id>.pub` to `dir/revoked/<id>.pub`. Once it returns `Ok`
/// the key is revoked on disk (record it so), even if the
/// [`sync_revoked`] that makes it durable then fails.
pub(crate) fn move_to_revoked(dir: &Path, id: &KeyId) -> Result<(), KeyError> {
    let from = dir.join(format!("{id}.{PUB_EXT}"));
    let rdir = dir.join(REVOKED_DIR);
    fs::create_dir_all(&rdir).map_err(io_err(&rdir))?;
    let to = rdir.join(format!("{id}.{PUB_EXT}"));
    fs::rename(&from, &to).map_err(io_err(&from))
}

/// Makes the moves of [`move_to_revoked`] under `dir` durable.
pub(crate) fn sync_revoked(dir: &Path) -> Result<(), KeyError> {
    sync_dir(dir)?;
    sync_dir(&dir.join(REVOKED_DIR))
}

fn pub_files(dir: &Path) -> Result<Vec<PathBuf>, KeyError> {
    let mut out = Vec::new();
    for ent in fs::read_dir(dir).map_err(io_err(dir))? {
        let ent = ent.map_err(io_err(dir))?;
        let path = ent.path();
        let is_file = ent.file_type().map_err(io_err(&path))?.is_file();
        if is_file && path.extension().and_then(|e| e.to_str()) == Some(PUB_EXT) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<(), KeyError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Writes `bytes` to a temporary file next to `path` with `mode`, fsyncs it,
/// then moves it into place: with `rename` (replacing) or, when
/// `no_replace`, with a hard link that fails if `path` exists.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32, no_replace: bool) -> Result<(), KeyError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("key");
    let tmp = dir.join(format!(".{name}.tmp.{:016x}", rand::rng().next_u64()));
    let result = (|| {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let mut f = opts.open(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        if no_replace {
            fs::hard_link(&tmp, path).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    KeyError::Exists {
                        path: path.to_path_buf(),
                    }
                } else {
                    io_err(path)(e)
                }
            })?;
        } else {
            fs::rename(&tmp, path).map_err(io_err(path))?;
        }
        sync_dir(dir)
    })();
    let _ = fs::remove_file(&tmp);
    result
}

/// Generates a key pair for `id` and writes it into `dir`:
///
/// - `<id>.key`: the private key, PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`,
///   as `openssl genpkey -algorithm ed25519` writes it), mode 0600;
/// - `<id>.pub`: the public key file (the key store format) with `role`.
///
/// Never overwrites: fails with [`KeyError::Exists`] if either file exists.
/// Copy `<id>.pub` into the registry's key store; keep `<id>.key` with the
/// agent. This is what `ippool keygen --id ID` calls.
pub fn generate_keypair(dir: &Path, id: &KeyId, role: Role) -> Result<SigningKey, KeyError> {
    let key_path = dir.join(format!("{id}.{KEY_EXT}"));
    let pub_path = dir.join(format!("{id}.{PUB_EXT}"));
    for p in [&key_path, &pub_path] {
        if p.exists() {
            return Err(KeyError::Exists { path: p.clone() });
        }
    }
    let signing = SigningKey::generate(&mut rand::rng());
    let pem = signing
        .to_pkcs8_pem(Default::default())
        .map_err(|e| KeyError::Parse {
            path: key_path.clone(),
            line: 0,
            message: format!("cannot encode the private key: {e}"),
        })?;
    write_atomic(&key_path, pem.as_bytes(), 0o600, true)?;
    let entry = KeyEntry {
        id: id.clone(),
        public_key: signing.verifying_key(),
        role,
        allow: Vec::new(),
    };
    if let Err(e) = write_atomic(&pub_path, entry.to_file_string().as_bytes(), 0o644, true) {
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    Ok(signing)
}

/// Reads a private key file written by [`generate_keypair`] (or by
/// `openssl genpkey -algorithm ed25519`): PKCS#8 PEM. On Unix, refuses a
/// file that group or others may read.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyError::Parse {
        path: path.to_path_buf(),
        line: 0,
        message: format!("not a PKCS#8 PEM Ed25519 private key: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new() -> TempDir {
            let p =
                std::env::temp_dir().join(format!("registry-keys-{:016x}", rand::rng().next_u64()));
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn add_refuses_a_file_copied_in_meanwhile_and_leaves_it_alone() {
        let dir = TempDir::new();
        let mut store = KeyStore::open(&dir.0).unwrap();
        let id = KeyId::new("web009").unwrap();
        let path = dir.0.join("web009.pub");
        fs::write(&path, "copied in by hand\n").unwrap();
        let entry = KeyEntry {
            id: id.clone(),
            public_key: ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key(),
            role: Role::Agent,
            allow: Vec::new(),
        };
        assert!(matches!(store.add(entry), Err(KeyError::Exists { .. })));
        assert_eq!(fs::read_to_string(&path).unwrap(), "copied in by hand\n");
        assert!(store.get(&id).is_none());
        let left: Vec<_> = fs::read_dir(&dir.0).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
    }

    #[test]
    fn two_adds_of_one_id_racing_outside_the_lock_leave_one_key() {
        // Both pass the shared check before either writes: the file link
        // decides, and the loser learns the key exists.
        let dir = TempDir::new();
        let mut store = KeyStore::open(&dir.0).unwrap();
        let id = KeyId::new("web010").unwrap();
        let entry = |seed: u8| KeyEntry {
            id: id.clone(),
            public_key: ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key(),
            role: Role::Agent,
            allow: Vec::new(),
        };
        let (p1, p2) = (store.check_add(&id).unwrap(), store.check_add(&id).unwrap());
        write_new(&p1, &entry(1)).unwrap();
        assert!(matches!(
            write_new(&p2, &entry(2)),
            Err(KeyError::Exists { .. })
        ));
        store.added(entry(1));
        assert_eq!(store.get(&id).unwrap().public_key, entry(1).public_key);
        assert!(matches!(store.check_add(&id), Err(KeyError::Exists { .. })));
        let reread = KeyStore::open(&dir.0).unwrap();
        assert_eq!(reread.get(&id).unwrap().public_key, entry(1).public_key);
        // Revoked by the steps: moved, and refused from then on.
        store.check_revoke(&id).unwrap();
        move_to_revoked(&dir.0, &id).unwrap();
        store.revoked_now(&id);
        assert!(store.is_revoked(&id));
        assert!(dir.0.join("revoked/web010.pub").is_file());
        assert!(matches!(
            store.check_revoke(&id),
            Err(KeyError::NotFound(_))
        ));
    }

    #[test]
    fn ids_are_validated() {
        for good in ["a", "web001", "web-1.prod_2", "0", &"a".repeat(64)] {
            assert!(KeyId::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "..",
            "../etc/passwd",
            "a/../../b",
            "a/b",
            "a\\b",
            "/abs",
            ".hidden",
            "-dash",
            "_under",
            "a..b",
            "Web",
            "web 1",
            "web\0",
            "wéb",
            "a:b",
            &"a".repeat(65),
        ] {
            assert!(
                matches!(KeyId::new(bad), Err(KeyError::InvalidId(_))),
                "{bad:?}"
            );
        }
    }

    fn key() -> VerifyingKey {
        SigningKey::generate(&mut rand::rng()).verifying_key()
    }

    #[test]
    fn key_files_round_trip_and_errors_name_file_and_line() {
        let path = Path::new("/keys/web.pub");
        let entry = KeyEntry {
            id: KeyId::new("web").unwrap(),
            public_key: key(),
            role: Role::Agent,
            allow: vec![Allow::Peer, Allow::Rule("10.0.0.0/8".parse().unwrap())],
        };
        let text = entry.to_file_string();
        assert_eq!(KeyEntry::parse(path, &text).unwrap(), entry);

        let b64 = B64.encode(key().as_bytes());
        let cases = [
            (
                format!("ed25519 {b64}\nrole agent\nallow 10.0.0.0/33\n"),
                3,
                "allow `10.0.0.0/33`",
            ),
            (format!("ed25519 {b64}\nrole root\n"), 2, "unknown role"),
            (format!("ed25519 {b64}\n"), 0, "roles are never implied"),
            ("role agent\n".to_string(), 0, "no `ed25519"),
            ("ed25519 AAAA\nrole agent\n".to_string(), 1, "3 bytes"),
            (
                format!("ed25519 {b64}\nrole admin\nallow peer\n"),
                3,
                "agent keys only",
            ),
            (
                format!("# c\n\ned25519 {b64}\nrole agent\nsudo yes\n"),
                5,
                "unknown keyword",
            ),
            (
                format!("ed25519 {b64}\ned25519 {b64}\nrole agent\n"),
                2,
                "second",
            ),
        ];
        for (text, line, msg) in cases {
            match KeyEntry::parse(path, &text) {
                Err(KeyError::Parse {
                    path: p,
                    line: l,
                    message,
                }) => {
                    assert_eq!(p, path);
                    assert_eq!(l, line, "{message}");
                    assert!(message.contains(msg), "{message}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        let e = KeyEntry::parse(Path::new("/keys/../x.pub"), &text);
        assert!(e.is_ok(), "the stem, not the path, is the id");
        let e = KeyEntry::parse(Path::new("/keys/Bad.pub"), &text).unwrap_err();
        assert!(e.to_string().contains("Bad.pub"), "{e}");
    }

    #[test]
    fn allow_policy() {
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let mut e = KeyEntry {
            id: KeyId::new("a").unwrap(),
            public_key: key(),
            role: Role::Agent,
            allow: vec![],
        };
        assert!(e.allows(peer, peer));
        assert!(e.allows("::ffff:127.0.0.1".parse().unwrap(), peer));
        assert!(!e.allows("127.0.0.2".parse().unwrap(), peer));
        e.allow = vec![Allow::Rule("10.0.0.0/8".parse().unwrap())];
        assert!(e.allows("10.9.9.9".parse().unwrap(), peer));
        assert!(
            !e.allows(peer, peer),
            "an explicit list replaces the default"
        );
        e.allow.push(Allow::Peer);
        assert!(e.allows(peer, peer));
        e.role = Role::Admin;
        assert!(!e.allows(peer, peer), "admin keys register nothing");
    }

    #[test]
    fn store_add_revoke_reload() {
        let dir = TempDir::new();
        let mut store = KeyStore::open(&dir.0).unwrap();
        assert_eq!(store.iter().count(), 0);
        let id = KeyId::new("web").unwrap();
        let entry = KeyEntry {
            id: id.clone(),
            public_key: key(),
            role: Role::Agent,
            allow: vec![],
        };
        store.add(entry.clone()).unwrap();
        assert!(dir.0.join("web.pub").is_file());
        assert!(matches!(
            store.add(entry.clone()),
            Err(KeyError::Exists { .. })
        ));
        let reopened = KeyStore::open(&dir.0).unwrap();
        assert_eq!(reopened.get(&id), Some(&entry));

        store.revoke(&id).unwrap();
        assert!(!dir.0.join("web.pub").exists());
        assert!(dir.0.join("revoked/web.pub").is_file());
        assert!(store.is_revoked(&id) && store.get(&id).is_none());
        assert!(matches!(store.revoke(&id), Err(KeyError::NotFound(_))));
        let reopened = KeyStore::open(&dir.0).unwrap();
        assert!(reopened.is_revoked(&id));
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("revoked")]);

        // A badly named .pub file is an error naming it; other files are ignored.
        fs::write(dir.0.join("notes.txt"), "hello").unwrap();
        assert!(KeyStore::open(&dir.0).is_ok());
        fs::write(dir.0.join("Bad Name.pub"), entry.to_file_string()).unwrap();
        let e = KeyStore::open(&dir.0).unwrap_err();
        assert!(e.to_string().contains("Bad Name.pub"), "{e}");
        // reload keeps the old state on error
        assert!(store.reload().is_err());
        assert!(store.is_revoked(&id));
    }

    #[test]
    fn keygen_writes_0600_private_key_and_never_overwrites() {
        let dir = TempDir::new();
        let id = KeyId::new("web001").unwrap();
        let signing = generate_keypair(&dir.0, &id, Role::Agent).unwrap();
        let key_path = dir.0.join("web001.key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let text = fs::read_to_string(&key_path).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
        let loaded = load_signing_key(&key_path).unwrap();
        assert_eq!(loaded.to_bytes(), signing.to_bytes());
        let store = KeyStore::open(&dir.0).unwrap();
        let entry = store.get(&id).unwrap();
        assert_eq!(entry.public_key, signing.verifying_key());
        assert_eq!(entry.role, Role::Agent);

        assert!(matches!(
            generate_keypair(&dir.0, &id, Role::Admin),
            Err(KeyError::Exists { .. })
        ));
        assert_eq!(
            load_signing_key(&key_path).unwrap().to_bytes(),
            signing.to_bytes()
        );

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                load_signing_key(&key_path),
                Err(KeyError::Permissions { .. })
            ));
        }
    }
}
