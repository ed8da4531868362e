//! Layers built by hand, byte by byte where a tar writer would refuse
//! (`..` names, device nodes, whiteouts that climb, sparse giants).

use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::*;

/// A tar stream being written.
#[derive(Default)]
struct Layer(Vec<u8>);

impl Layer {
    /// Appends an entry; `name` and `link` go into the header as raw bytes.
    fn raw(mut self, name: &[u8], kind: tar::EntryType, mode: u32, data: &[u8], link: &[u8]) -> Self {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        self.push(h.as_bytes(), data);
        self
    }

    fn push(&mut self, header: &[u8], data: &[u8]) {
        self.0.extend_from_slice(header);
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().div_ceil(512) * 512, 0);
    }

    fn dir(self, name: &str) -> Self {
        self.raw(name.as_bytes(), tar::EntryType::Directory, 0o755, b"", b"")
    }

    fn file(self, name: &str, data: &[u8]) -> Self {
        self.raw(name.as_bytes(), tar::EntryType::Regular, 0o644, data, b"")
    }

    fn symlink(self, name: &str, target: &str) -> Self {
        self.raw(name.as_bytes(), tar::EntryType::Symlink, 0o777, b"", target.as_bytes())
    }

    fn hardlink(self, name: &str, target: &str) -> Self {
        self.raw(name.as_bytes(), tar::EntryType::Link, 0o644, b"", target.as_bytes())
    }

    /// A PAX extended header with `records` for the next entry.
    fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        let mut body = Vec::new();
        for (k, v) in records {
            let rest = k.len() + v.len() + 3; // ' ', '=', '\n'
            let mut len = rest + 1;
            while len != rest + len.to_string().len() {
                len = rest + len.to_string().len();
            }
            body.extend_from_slice(format!("{len} {k}=").as_bytes());
            body.extend_from_slice(v);
            body.push(b'\n');
        }
        let mut h = tar::Header::new_ustar();
        h.set_path("PaxHeaders/x").unwrap();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(body.len() as u64);
        h.set_cksum();
        self.push(h.as_bytes(), &body);
        self
    }

    /// A GNU sparse file of `real` bytes whose one data block is `data` at offset 0.
    fn sparse(mut self, name: &str, real: u64, data: &[u8]) -> Self {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        let octal = |field: &mut [u8; 12], n: u64| {
            let s = format!("{n:011o}");
            field.fill(0);
            field[..s.len()].copy_from_slice(s.as_bytes());
        };
        let gnu = h.as_gnu_mut().unwrap();
        octal(&mut gnu.realsize, real);
        octal(&mut gnu.sparse[0].offset, 0);
        octal(&mut gnu.sparse[0].numbytes, data.len() as u64);
        // The hole up to the real size: a last, empty block there.
        octal(&mut gnu.sparse[1].offset, real);
        octal(&mut gnu.sparse[1].numbytes, 0);
        h.set_cksum();
        self.push(h.as_bytes(), data);
        self
    }

    fn bytes(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
}

/// A scratch directory holding `root/` (what layers apply to) and
/// `outside/victim` (what no layer may touch).
struct Scratch {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"untouched").unwrap();
        Self { _dir: dir, root, outside }
    }

    fn apply_with(&self, layer: Vec<u8>, budget: &mut Budget) -> Result<LayerStats, UnpackError> {
        let root = std::fs::File::open(&self.root).unwrap();
        apply_layer(root.as_fd(), layer.as_slice(), budget, Owners::Ignore)
    }

    fn apply(&self, layer: Vec<u8>) -> Result<LayerStats, UnpackError> {
        self.apply_with(layer, &mut Budget::DEFAULT.clone())
    }

    /// Asserts the outside is exactly as it was.
    fn outside_untouched(&self) {
        let names: Vec<_> = std::fs::read_dir(&self.outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("victim")], "something was written outside the root");
        let victim = self.outside.join("victim");
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(std::fs::metadata(&victim).unwrap().nlink(), 1, "the victim was hardlinked");
    }

    fn refused(&self, layer: Vec<u8>, why: &str) {
        let e = self.apply(layer).unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
        self.outside_untouched();
    }
}

fn rel(p: &Path) -> String {
    p.to_str().unwrap().trim_start_matches('/').to_owned()
}

#[test]
fn a_plain_layer_is_applied_with_modes_links_and_missing_parents() {
    let s = Scratch::new();
    let layer = Layer::default()
        .dir("etc/")
        .file("etc/hostname", b"box\n")
        .raw(b"usr/bin/tool", tar::EntryType::Regular, 0o4755, b"#!", b"")
        .symlink("bin", "usr/bin")
        .hardlink("etc/hostname.bak", "etc/hostname")
        .raw(b"run/pipe", tar::EntryType::Fifo, 0o600, b"", b"")
        .bytes();
    let stats = s.apply(layer).unwrap();
    assert_eq!(stats, LayerStats { entries: 6, whiteouts: 0, bytes: 6 });
    assert_eq!(std::fs::read(s.root.join("etc/hostname")).unwrap(), b"box\n");
    let tool = std::fs::metadata(s.root.join("usr/bin/tool")).unwrap();
    assert_eq!(tool.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(tool.mtime(), 1_700_000_000);
    assert_eq!(std::fs::read_link(s.root.join("bin")).unwrap(), Path::new("usr/bin"));
    assert_eq!(
        std::fs::metadata(s.root.join("etc/hostname.bak")).unwrap().ino(),
        std::fs::metadata(s.root.join("etc/hostname")).unwrap().ino()
    );
    assert!(std::fs::symlink_metadata(s.root.join("run/pipe")).unwrap().file_type().is_fifo());
    // A parent the tar never named is made 0755.
    assert_eq!(std::fs::metadata(s.root.join("usr")).unwrap().permissions().mode() & 0o7777, 0o755);
}

#[test]
fn whiteouts_remove_lower_entries_in_their_own_directory_only() {
    let s = Scratch::new();
    s.apply(Layer::default().file("a/b/c", b"1").file("a/keep", b"2").file("d/x", b"3").file("d/y", b"4").bytes())
        .unwrap();
    // The opaque marker comes after an entry of its own layer: that entry stays.
    let upper = Layer::default()
        .file("a/.wh.b", b"")
        .file("d/z", b"5")
        .file("d/.wh..wh..opq", b"")
        .file("a/.wh.never-was", b"")
        .bytes();
    let stats = s.apply(upper).unwrap();
    assert!(!s.root.join("a/b").exists());
    assert!(s.root.join("a/keep").exists());
    assert!(!s.root.join("d/x").exists() && !s.root.join("d/y").exists());
    assert_eq!(std::fs::read(s.root.join("d/z")).unwrap(), b"5");
    assert!(!s.root.join("d/.wh..wh..opq").exists() && !s.root.join("a/.wh.b").exists());
    assert_eq!((stats.entries, stats.whiteouts), (1, 3));
    // A file replaces a directory, a directory a file.
    s.apply(Layer::default().file("a", b"now a file").dir("d/z/").bytes()).unwrap();
    assert_eq!(std::fs::read(s.root.join("a")).unwrap(), b"now a file");
    assert!(s.root.join("d/z").is_dir());
}

#[test]
fn names_that_climb_out_are_refused() {
    let s = Scratch::new();
    s.refused(Layer::default().file("../outside/evil", b"x").bytes(), "climbs");
    s.refused(Layer::default().file("a/../../outside/evil", b"x").bytes(), "climbs");
    // A leading slash is the root's.
    s.apply(Layer::default().file("/etc/abs", b"x").bytes()).unwrap();
    assert!(s.root.join("etc/abs").exists());
    s.outside_untouched();
}

#[test]
fn writes_through_symlinks_stay_inside_the_root() {
    let s = Scratch::new();
    let abs = s.outside.to_str().unwrap().to_owned();
    // Absolute and relative symlinks to the outside, then writes through
    // them: resolved inside the root, where the target does not exist.
    for (link, target) in [("abs", abs.as_str()), ("rel", "../outside")] {
        let e = s.apply(Layer::default().symlink(link, target).file(&format!("{link}/victim"), b"pwned").bytes());
        assert!(e.unwrap_err().to_string().contains("through a symlink"));
        s.outside_untouched();
    }
    // Climbing with a symlink stops at the root: what is written lands
    // inside, where the container sees it.
    let layer = Layer::default()
        .symlink("up", "../../../../..")
        .file(&format!("up/{}/victim", rel(&s.outside)), b"pwned")
        .bytes();
    s.apply(layer).unwrap();
    s.outside_untouched();
    assert_eq!(std::fs::read(s.root.join(rel(&s.outside)).join("victim")).unwrap(), b"pwned");
    // A whiteout through a symlink removes inside the root only.
    s.apply(Layer::default().file("abs/.wh.victim", b"").file("rel/.wh.victim", b"").bytes()).unwrap();
    s.apply(Layer::default().file(&format!("up/{}/.wh.victim", rel(&s.outside)), b"").bytes()).unwrap();
    assert!(!s.root.join(rel(&s.outside)).join("victim").exists());
    s.outside_untouched();
}

#[test]
fn hardlinks_out_of_the_root_are_refused() {
    let s = Scratch::new();
    s.refused(Layer::default().hardlink("h", "../outside/victim").bytes(), "climbs");
    // An absolute target is the root's path: the outside's victim is not there.
    let abs = format!("{}/victim", s.outside.to_str().unwrap());
    s.refused(Layer::default().hardlink("h", &abs).bytes(), "hardlink target");
    // Through a symlink to the outside: resolved inside, so not found either.
    s.refused(
        Layer::default().symlink("l", s.outside.to_str().unwrap()).hardlink("h", "l/victim").bytes(),
        "hardlink target",
    );
    // A symlink as target is linked itself, not what it points to.
    s.apply(Layer::default().symlink("s", &abs).hardlink("h2", "s").bytes()).unwrap();
    assert_eq!(std::fs::read_link(s.root.join("h2")).unwrap(), PathBuf::from(&abs));
    s.outside_untouched();
}

#[test]
fn whiteouts_that_escape_their_directory_are_refused() {
    let s = Scratch::new();
    s.apply(Layer::default().file("etc/passwd", b"root").bytes()).unwrap();
    s.refused(Layer::default().file("../../.wh.outside", b"").bytes(), "climbs");
    s.refused(Layer::default().file("etc/.wh.../../outside", b"").bytes(), "climbs");
    s.refused(Layer::default().file("etc/.wh..", b"").bytes(), "names no entry");
    s.refused(Layer::default().file("etc/.wh...", b"").bytes(), "names no entry");
    s.refused(Layer::default().file("etc/.wh.", b"").bytes(), "names no entry");
    assert!(s.root.join("etc/passwd").exists());
}

#[test]
fn a_sparse_giant_and_oversized_layers_are_refused_before_writing() {
    let s = Scratch::new();
    // 10 GB of sparse file, 512 bytes of it in the tar.
    let e = s.apply(Layer::default().sparse("big", 10_000_000_000, &[7u8; 512]).bytes()).unwrap_err();
    assert!(matches!(e, UnpackError::TooLarge { .. }), "{e}");
    assert!(!s.root.join("big").exists());
    // The budget spans layers.
    let mut budget = Budget { bytes: 10, entries: 100 };
    s.apply_with(Layer::default().file("a", b"123456").bytes(), &mut budget).unwrap();
    assert_eq!(budget.bytes, 4);
    let e = s.apply_with(Layer::default().file("b", b"123456").bytes(), &mut budget).unwrap_err();
    assert!(matches!(e, UnpackError::TooLarge { .. }), "{e}");
    let mut few = Budget { bytes: 1 << 20, entries: 2 };
    let e = s.apply_with(Layer::default().dir("x/").dir("y/").dir("z/").bytes(), &mut few).unwrap_err();
    assert!(e.to_string().contains("entry count"), "{e}");
    s.outside_untouched();
}

#[test]
fn device_nodes_and_privileged_xattrs_are_refused() {
    let s = Scratch::new();
    s.refused(Layer::default().raw(b"dev/sda", tar::EntryType::Block, 0o600, b"", b"").bytes(), "device node");
    s.refused(Layer::default().raw(b"dev/mem", tar::EntryType::Char, 0o600, b"", b"").bytes(), "device node");
    assert!(!s.root.join("dev/sda").exists() && !s.root.join("dev/mem").exists());
    for attr in ["security.capability", "trusted.overlay.opaque"] {
        let key = format!("SCHILY.xattr.{attr}");
        let layer = Layer::default().pax(&[(&key, b"\x01\x00")]).file("bin/ping", b"x").bytes();
        s.refused(layer, attr);
    }
    // Another attribute is not a reason to refuse.
    s.apply(Layer::default().pax(&[("SCHILY.xattr.user.note", b"hi")]).file("ok", b"x").bytes()).unwrap();
}

#[test]
fn a_truncated_or_garbage_layer_is_an_error() {
    let s = Scratch::new();
    let mut layer = Layer::default().file("a", &[1u8; 2000]).bytes();
    layer.truncate(1024);
    assert!(s.apply(layer).is_err());
    assert!(s.apply(vec![0xff; 4096]).is_err());
    s.outside_untouched();
}
