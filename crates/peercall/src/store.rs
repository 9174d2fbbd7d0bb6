//! The data directory: the node's identity and other state that must survive a crash
//! or restart.
//!
//! Layout (all files mode 0600, the directory 0700):
//!
//! | file | what | written |
//! |---|---|---|
//! | `identity.key` | the node's identity (see `peercall_crypto::identity`) | once, on first start; never replaced |
//! | `admin.token` | bearer token for state-changing admin requests, 64 hex digits | at every start |
//! | `udp.addr` | the bound UDP address, one line | once bound |
//! | `admin.addr` | the bound admin HTTP address, one line | last: the node is ready |
//! | `lock` | held locked while a node runs on this directory | at start |
//! | `hosts.json` | the host cache: known supernodes (see `crate::hosts`) | every `state_save_secs` and at shutdown |
//! | `contacts.json` | the user's contacts, pinned by user id (see `crate::book`) | at every change |
//!
//! Every write is atomic ([`write_atomic`]): a crash leaves the old version or the new
//! one, never a torn file. State files use the same pair, [`DataDir::write`] and
//! [`DataDir::read_private`], one file each; one that does not load is renamed
//! aside ([`DataDir::set_aside`]) so its bytes survive for inspection and the node
//! starts without it.

use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use peercall_crypto::identity::KEY_FILE_LEN;
use peercall_crypto::{Identity, IdentityError};
use rand_core::CryptoRngCore;
use thiserror::Error;

/// The identity key file.
pub const IDENTITY_FILE: &str = "identity.key";
/// The admin bearer token file.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The bound UDP address.
pub const UDP_ADDR_FILE: &str = "udp.addr";
/// The bound admin HTTP address; written last, so its presence means "ready".
pub const ADMIN_ADDR_FILE: &str = "admin.addr";
/// The lock that keeps two nodes off one directory.
pub const LOCK_FILE: &str = "lock";
/// The persisted host cache.
pub const HOSTS_FILE: &str = "hosts.json";
/// The user's contacts.
pub const CONTACTS_FILE: &str = "contacts.json";

/// Mode of the data directory: the owner only.
const DIR_MODE: u32 = 0o700;
/// Mode of every file in it: the owner only (keys, tokens, contacts are private).
const FILE_MODE: u32 = 0o600;
/// Permission bits for group and others, which must all be clear.
const GROUP_OTHER_BITS: u32 = 0o077;
/// Names tried by [`DataDir::set_aside`] within one second before giving up.
const MAX_SET_ASIDE_TRIES: u32 = 100;

/// Why the data directory could not be used.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A file system operation failed.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The directory is open to group or others and could not be made private.
    #[error(
        "data directory {} has mode {mode:04o}, accessible by group or others, and could \
         not be made private ({source}); run `chmod 700 {}` or choose another data_dir",
        path.display(), path.display()
    )]
    DirPermissions {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Why `chmod` failed.
        source: io::Error,
    },
    /// A private file is readable or writable by group or others.
    #[error(
        "{} has mode {mode:04o}, accessible by group or others; run `chmod 600 {}` \
         (if other users could read it, treat the key as exposed: move the file aside \
         to create a new identity)",
        path.display(), path.display()
    )]
    FilePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The identity file does not load; it is left as it is.
    #[error(
        "{}: {source}. The file was left untouched: restore it from a backup, or move \
         it aside to create a new identity (a new user id)",
        path.display()
    )]
    CorruptIdentity {
        /// The file.
        path: PathBuf,
        /// Why.
        source: IdentityError,
    },
    /// Something that is not a regular file sits where a state file belongs.
    #[error("{} is not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// Another node runs on this directory.
    #[error("data directory {} is in use by another running peercall node", path.display())]
    InUse {
        /// The directory.
        path: PathBuf,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// Writes `bytes` to `path` atomically with `mode`: a temporary file in the same
/// directory is written, synced, renamed over `path`, and the directory synced, so
/// after a crash `path` holds either its old contents or the new ones.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    // A leftover from a crash; writers of this directory are serialised by its lock.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have cleared bits of `mode`; never add any it did not have.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// An open data directory, locked for this process.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    /// The directory's former mode, if [`DataDir::open`] had to make it private.
    pub tightened: Option<u32>,
    /// Held (locked) for the life of the node.
    _lock: File,
}

impl DataDir {
    /// Opens `root`, creating it (mode 0700) if missing, and locks it. An existing
    /// directory that group or others can access is made private (see
    /// [`DataDir::tightened`]); one another node is using is refused.
    pub fn open(root: &Path) -> Result<DataDir, StoreError> {
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        match DirBuilder::new().mode(DIR_MODE).create(root) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(io_err("create", root)(e));
            }
            _ => {}
        }
        let meta = fs::metadata(root).map_err(io_err("read", root))?;
        if !meta.is_dir() {
            return Err(io_err("use", root)(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        // An existing directory open to others is made private, as Tor does with its
        // DataDirectory: the files in it are private either way (mode 0600), and the
        // caller logs that the mode was changed.
        let mode = meta.permissions().mode() & 0o7777;
        let mut tightened = None;
        if mode & GROUP_OTHER_BITS != 0 {
            fs::set_permissions(root, fs::Permissions::from_mode(DIR_MODE)).map_err(|source| {
                StoreError::DirPermissions {
                    path: root.to_owned(),
                    mode,
                    source,
                }
            })?;
            tightened = Some(mode);
        }
        let lock_path = root.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::InUse {
                    path: root.to_owned(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
        }
        Ok(DataDir {
            root: root.to_owned(),
            tightened,
            _lock: lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The path of a file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Writes a state file atomically, mode 0600.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.file(name);
        write_atomic(&path, bytes, FILE_MODE).map_err(io_err("write", &path))
    }

    /// Reads a private state file of at most `max_len` bytes (longer is cut there,
    /// and the parser will report it). `None` if it does not exist. Refuses a file
    /// that group or others can access.
    pub fn read_private(&self, name: &str, max_len: usize) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.file(name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        // Check the opened file itself, not the path, so nothing can swap it between.
        let meta = file.metadata().map_err(io_err("read", &path))?;
        if !meta.is_file() {
            return Err(StoreError::NotAFile { path });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & GROUP_OTHER_BITS != 0 {
            return Err(StoreError::FilePermissions { path, mode });
        }
        let mut bytes = Vec::new();
        let limit = u64::try_from(max_len).unwrap_or(u64::MAX).saturating_add(1);
        file.take(limit)
            .read_to_end(&mut bytes)
            .map_err(io_err("read", &path))?;
        Ok(Some(bytes))
    }

    /// Removes a state file if present.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let path = self.file(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    /// Renames a state file that does not load to `<name>.corrupt-<unix seconds>`
    /// (with a counter if that exists too), so its bytes are kept for inspection and
    /// the next write starts afresh; returns the new path.
    pub fn set_aside(&self, name: &str, unix_secs: u64) -> Result<PathBuf, StoreError> {
        let from = self.file(name);
        for n in 0..MAX_SET_ASIDE_TRIES {
            let to = match n {
                0 => self.file(&format!("{name}.corrupt-{unix_secs}")),
                n => self.file(&format!("{name}.corrupt-{unix_secs}.{n}")),
            };
            // Never overwrite an earlier one: that would lose the evidence.
            if fs::symlink_metadata(&to).is_ok() {
                continue;
            }
            fs::rename(&from, &to).map_err(io_err("rename", &from))?;
            File::open(&self.root)
                .and_then(|d| d.sync_all())
                .map_err(io_err("sync", &self.root))?;
            return Ok(to);
        }
        Err(io_err("rename", &from)(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "too many files set aside in the same second",
        )))
    }

    /// Loads the identity, or creates and saves a new one on first start. Returns it and
    /// whether it was created. A corrupt or exposed key file is an error, never replaced.
    pub fn load_or_create_identity(
        &self,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(Identity, bool), StoreError> {
        if let Some(bytes) = self.read_private(IDENTITY_FILE, KEY_FILE_LEN)? {
            let identity = Identity::from_file_bytes(&bytes).map_err(|source| {
                StoreError::CorruptIdentity {
                    path: self.file(IDENTITY_FILE),
                    source,
                }
            })?;
            return Ok((identity, false));
        }
        let identity = Identity::generate(rng);
        self.write(IDENTITY_FILE, &identity.to_file_bytes())?;
        Ok((identity, true))
    }

    /// Records a bound address (`udp.addr`, `admin.addr`) as one line of text.
    pub fn write_addr(&self, name: &str, addr: SocketAddr) -> Result<(), StoreError> {
        self.write(name, format!("{addr}\n").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_private_directory_and_identity_once() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("a/b/peercall");
        let dir = DataDir::open(&root).unwrap();
        assert_eq!(mode(&root), 0o700);
        let (id, created) = dir.load_or_create_identity(&mut OsRng).unwrap();
        assert!(created);
        assert_eq!(mode(&root.join(IDENTITY_FILE)), 0o600);
        let (again, created) = dir.load_or_create_identity(&mut OsRng).unwrap();
        assert!(!created);
        assert_eq!(again.user_id(), id.user_id());
        assert_eq!(again.peer_key(), id.peer_key());
    }

    #[test]
    fn refuses_exposed_key_file_and_says_how_to_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        dir.load_or_create_identity(&mut OsRng).unwrap();
        let key = dir.file(IDENTITY_FILE);
        for bad in [0o644, 0o640, 0o604, 0o620] {
            fs::set_permissions(&key, fs::Permissions::from_mode(bad)).unwrap();
            let err = dir.load_or_create_identity(&mut OsRng).unwrap_err();
            assert!(matches!(err, StoreError::FilePermissions { mode, .. } if mode == bad));
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("chmod 600 {}", key.display())),
                "{msg}"
            );
        }
        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(
            dir.load_or_create_identity(&mut OsRng).is_ok(),
            "owner-only read is fine"
        );
    }

    #[test]
    fn corrupt_key_file_is_reported_and_left_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        for junk in [
            &b"not a key"[..],
            &[0u8; KEY_FILE_LEN][..],
            &[b'P'; 4 * KEY_FILE_LEN][..],
        ] {
            dir.write(IDENTITY_FILE, junk).unwrap();
            let err = dir.load_or_create_identity(&mut OsRng).unwrap_err();
            assert!(matches!(err, StoreError::CorruptIdentity { .. }), "{err}");
            assert!(err.to_string().contains("left untouched"));
            assert_eq!(fs::read(dir.file(IDENTITY_FILE)).unwrap(), junk);
        }
        // A damaged real key (one flipped bit) too.
        let good = Identity::generate(&mut OsRng).to_file_bytes();
        let mut bad = good;
        bad[40] ^= 1;
        dir.write(IDENTITY_FILE, &bad).unwrap();
        assert!(dir.load_or_create_identity(&mut OsRng).is_err());
        assert_eq!(fs::read(dir.file(IDENTITY_FILE)).unwrap(), bad);
    }

    #[test]
    fn makes_an_open_directory_private() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("open");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let dir = DataDir::open(&root).unwrap();
        assert_eq!(dir.tightened, Some(0o755));
        assert_eq!(mode(&root), 0o700);
        drop(dir);
        assert_eq!(DataDir::open(&root).unwrap().tightened, None);
    }

    #[test]
    fn one_node_per_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let first = DataDir::open(tmp.path()).unwrap();
        assert!(matches!(
            DataDir::open(tmp.path()),
            Err(StoreError::InUse { .. })
        ));
        drop(first);
        DataDir::open(tmp.path()).unwrap();
    }

    #[test]
    fn atomic_write_replaces_whole_file_and_cleans_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        // A temporary file left by a crash mid-write does not block the next write.
        fs::write(tmp.path().join(".hosts.tmp"), b"half").unwrap();
        dir.write("hosts", b"one").unwrap();
        dir.write("hosts", b"two, longer").unwrap();
        assert_eq!(
            dir.read_private("hosts", 100).unwrap().unwrap(),
            b"two, longer"
        );
        assert_eq!(mode(&dir.file("hosts")), 0o600);
        assert!(!tmp.path().join(".hosts.tmp").exists());
        assert_eq!(dir.read_private("missing", 10).unwrap(), None);
        assert_eq!(
            dir.read_private("hosts", 3).unwrap().unwrap().len(),
            4,
            "cut at max+1"
        );
        dir.remove("hosts").unwrap();
        dir.remove("hosts").unwrap();
        assert_eq!(dir.read_private("hosts", 10).unwrap(), None);
    }

    #[test]
    fn set_aside_keeps_every_corrupt_version() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        dir.write(HOSTS_FILE, b"junk 1").unwrap();
        let first = dir.set_aside(HOSTS_FILE, 42).unwrap();
        assert_eq!(first, dir.file("hosts.json.corrupt-42"));
        assert_eq!(fs::read(&first).unwrap(), b"junk 1");
        assert_eq!(dir.read_private(HOSTS_FILE, 100).unwrap(), None);
        dir.write(HOSTS_FILE, b"junk 2").unwrap();
        let second = dir.set_aside(HOSTS_FILE, 42).unwrap();
        assert_eq!(second, dir.file("hosts.json.corrupt-42.1"));
        assert_eq!(fs::read(&first).unwrap(), b"junk 1");
        assert_eq!(fs::read(&second).unwrap(), b"junk 2");
        assert!(dir.set_aside(HOSTS_FILE, 43).is_err(), "nothing to rename");
    }

    #[test]
    fn addresses_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        let addr: SocketAddr = "[::1]:7600".parse().unwrap();
        dir.write_addr(UDP_ADDR_FILE, addr).unwrap();
        let text = fs::read_to_string(dir.file(UDP_ADDR_FILE)).unwrap();
        assert_eq!(text.trim().parse::<SocketAddr>().unwrap(), addr);
    }
}
