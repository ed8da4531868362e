//! Layouts written by [`crate::build_layout`] (and by hand where it would
//! not write what is tested), read back in every form, and tampered with.

use std::fs;
use std::os::unix::fs::symlink;

use super::*;
use crate::build::build_layout;

/// A small root filesystem: a file, a directory, a symlink.
fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::write(root.join("bin/hello"), b"#!/bin/sh\necho hello\n").unwrap();
    symlink("bin/hello", root.join("greet")).unwrap();
    root
}

fn layout(dir: &Path) -> (PathBuf, Digest) {
    let out = dir.join("layout");
    let d = build_layout(&rootfs(dir), &out, "demo:1").unwrap();
    (out, d)
}

fn amd64() -> Platform {
    Platform::default()
}

/// A tar of `dir`'s files (an OCI archive).
fn tar_of(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

fn index(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(out.join("index.json")).unwrap()).unwrap()
}

fn manifest(out: &Path, d: &Digest) -> serde_json::Value {
    serde_json::from_slice(&fs::read(out.join(blob_path(d))).unwrap()).unwrap()
}

/// Rewrites blob `d` with `f` applied, returns the new digest (the old blob stays).
fn rewrite_blob(out: &Path, d: &Digest, f: impl FnOnce(&mut serde_json::Value)) -> (Digest, u64) {
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(out.join(blob_path(d))).unwrap()).unwrap();
    f(&mut v);
    let bytes = serde_json::to_vec(&v).unwrap();
    let nd = Digest::of(&bytes);
    fs::write(out.join(blob_path(&nd)), &bytes).unwrap();
    (nd, bytes.len() as u64)
}

/// Points the index's only manifest at `d`.
fn point_index(out: &Path, d: &Digest, size: u64) {
    let mut i = index(out);
    i["manifests"][0]["digest"] = d.as_str().into();
    i["manifests"][0]["size"] = size.into();
    fs::write(out.join("index.json"), serde_json::to_vec(&i).unwrap()).unwrap();
}

#[test]
fn a_built_layout_loads_from_a_directory_and_from_an_archive_with_one_digest() {
    let dir = tempfile::tempdir().unwrap();
    let (out, d) = layout(dir.path());
    let img = load(&Source::open(&out).unwrap(), &amd64(), None).unwrap();
    assert_eq!(img.digest, d);
    assert_eq!(img.name.as_deref(), Some("demo:1"));
    assert_eq!(img.layers.len(), 1);
    assert_eq!(img.layers[0].media_type, media::LAYER_GZIP);
    assert_eq!(img.platform, amd64());
    let archive = dir.path().join("image.tar");
    tar_of(&out, &archive);
    let again = load(&Source::open(&archive).unwrap(), &amd64(), None).unwrap();
    assert_eq!((again.digest, again.config_digest), (img.digest.clone(), img.config_digest.clone()));
    // The same tree again is the same image.
    assert_eq!(build_layout(&dir.path().join("rootfs"), &dir.path().join("again"), "demo:1").unwrap(), d);
    // Its layer unpacks to the tree.
    let root = dir.path().join("unpacked");
    fs::create_dir(&root).unwrap();
    let src = Source::open(&out).unwrap();
    let (blob, _) = src.file(&blob_path(&img.layers[0].digest)).unwrap();
    let rootfd = File::open(&root).unwrap();
    let tar = Compression::Gzip.reader(blob).unwrap();
    crate::apply_layer(std::os::fd::AsFd::as_fd(&rootfd), tar, &mut crate::Budget::default(), crate::Owners::Ignore)
        .unwrap();
    assert_eq!(fs::read(root.join("bin/hello")).unwrap(), b"#!/bin/sh\necho hello\n");
    assert_eq!(fs::read_link(root.join("greet")).unwrap(), Path::new("bin/hello"));
}

#[test]
fn every_blob_is_checked_by_digest_size_and_diff_id() {
    let dir = tempfile::tempdir().unwrap();
    let (out, d) = layout(dir.path());
    let m = manifest(&out, &d);
    let layer: Digest = m["layers"][0]["digest"].as_str().unwrap().parse().unwrap();
    let config: Digest = m["config"]["digest"].as_str().unwrap().parse().unwrap();

    // A flipped byte in the layer.
    let path = out.join(blob_path(&layer));
    let good = fs::read(&path).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    fs::write(&path, &bad).unwrap();
    let e = load(&Source::open(&out).unwrap(), &amd64(), None).unwrap_err();
    assert!(matches!(&e, LayoutError::Mismatch { digest, .. } if *digest == layer), "{e}");
    // Bytes appended to it.
    let mut long = good.clone();
    long.extend_from_slice(b"more");
    fs::write(&path, &long).unwrap();
    let e = load(&Source::open(&out).unwrap(), &amd64(), None).unwrap_err();
    assert!(e.to_string().contains("descriptor says"), "{e}");
    fs::write(&path, &good).unwrap();

    // A config whose DiffID is not the layer's uncompressed digest.
    let (cfg, cfg_size) =
        rewrite_blob(&out, &config, |c| c["rootfs"]["diff_ids"][0] = Digest::of(b"other").as_str().into());
    let (m2, m2_size) = rewrite_blob(&out, &d, |m| {
        m["config"]["digest"] = cfg.as_str().into();
        m["config"]["size"] = cfg_size.into();
    });
    point_index(&out, &m2, m2_size);
    let e = load(&Source::open(&out).unwrap(), &amd64(), None).unwrap_err();
    assert!(e.to_string().contains("DiffID"), "{e}");

    // A manifest whose size in the index is wrong.
    point_index(&out, &d, 3);
    let e = load(&Source::open(&out).unwrap(), &amd64(), None).unwrap_err();
    assert!(e.to_string().contains("descriptor says"), "{e}");
    // A digest that is not sha256, or names a path.
    for bad in ["sha512:abcd", "sha256:../../../etc/passwd"] {
        let mut i = index(&out);
        i["manifests"][0]["digest"] = bad.into();
        fs::write(out.join("index.json"), serde_json::to_vec(&i).unwrap()).unwrap();
        assert!(load(&Source::open(&out).unwrap(), &amd64(), None).is_err(), "{bad}");
    }
}

#[test]
fn the_platform_and_the_name_pick_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let (out, d) = layout(dir.path());
    let arm: Platform = "linux/arm64".parse().unwrap();
    let e = load(&Source::open(&out).unwrap(), &arm, None).unwrap_err();
    assert!(e.to_string().contains("no image for linux/arm64"), "{e}");
    // Two images: a name is needed.
    fs::write(dir.path().join("rootfs/extra"), b"x").unwrap();
    let d2 = build_layout(&dir.path().join("rootfs"), &out, "demo:2").unwrap();
    assert_ne!(d, d2);
    let e = load(&Source::open(&out).unwrap(), &amd64(), None).unwrap_err();
    assert!(e.to_string().contains("name one"), "{e}");
    assert_eq!(load(&Source::open(&out).unwrap(), &amd64(), Some("demo:2")).unwrap().digest, d2);
    assert_eq!(load(&Source::open(&out).unwrap(), &amd64(), Some("1")).unwrap().digest, d);
    assert!(load(&Source::open(&out).unwrap(), &amd64(), Some("nope")).is_err());
    for bad in ["linux", "/amd64", "a/b/c/d"] {
        assert!(bad.parse::<Platform>().is_err(), "{bad}");
    }
}

#[test]
fn a_nested_index_and_zstd_and_plain_layers_load() {
    let dir = tempfile::tempdir().unwrap();
    let (out, d) = layout(dir.path());
    let m = manifest(&out, &d);
    let layer: Digest = m["layers"][0]["digest"].as_str().unwrap().parse().unwrap();
    let gz = fs::read(out.join(blob_path(&layer))).unwrap();
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut plain).unwrap();
    let zst = zstd::stream::encode_all(&plain[..], 3).unwrap();
    for (bytes, media_type) in [(plain.clone(), media::LAYER), (zst, media::LAYER_ZSTD)] {
        let ld = Digest::of(&bytes);
        fs::write(out.join(blob_path(&ld)), &bytes).unwrap();
        let (m2, m2_size) = rewrite_blob(&out, &d, |m| {
            m["layers"][0] = serde_json::json!({"mediaType": media_type, "digest": ld.as_str(), "size": bytes.len()});
        });
        // Behind a nested index, as a multi-platform image is.
        let nested = serde_json::json!({"schemaVersion": 2, "mediaType": media::INDEX, "manifests": [
            {"mediaType": media::MANIFEST, "digest": m2.as_str(), "size": m2_size,
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": media::MANIFEST, "digest": Digest::of(b"arm").as_str(), "size": 3,
             "platform": {"os": "linux", "architecture": "arm64"}},
        ]});
        let nb = serde_json::to_vec(&nested).unwrap();
        let nd = Digest::of(&nb);
        fs::write(out.join(blob_path(&nd)), &nb).unwrap();
        let mut i = index(&out);
        i["manifests"][0] = serde_json::json!({"mediaType": media::INDEX, "digest": nd.as_str(), "size": nb.len()});
        fs::write(out.join("index.json"), serde_json::to_vec(&i).unwrap()).unwrap();
        let img = load(&Source::open(&out).unwrap(), &amd64(), None).unwrap();
        assert_eq!((img.digest, img.layers[0].media_type.as_str()), (m2, media_type));
    }
}

#[test]
fn a_legacy_docker_save_tar_loads_through_a_manifest_of_ours() {
    let dir = tempfile::tempdir().unwrap();
    let (out, d) = layout(dir.path());
    let m = manifest(&out, &d);
    let layer: Digest = m["layers"][0]["digest"].as_str().unwrap().parse().unwrap();
    let config: Digest = m["config"]["digest"].as_str().unwrap().parse().unwrap();
    let legacy = dir.path().join("legacy");
    fs::create_dir_all(legacy.join("abc")).unwrap();
    let mut plain = Vec::new();
    let gz = fs::read(out.join(blob_path(&layer))).unwrap();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut plain).unwrap();
    fs::write(legacy.join("abc/layer.tar"), &plain).unwrap();
    fs::copy(out.join(blob_path(&config)), legacy.join(format!("{}.json", config.hex()))).unwrap();
    let entries = serde_json::json!([{"Config": format!("{}.json", config.hex()), "RepoTags": ["demo:old"], "Layers": ["abc/layer.tar"]}]);
    fs::write(legacy.join("manifest.json"), serde_json::to_vec(&entries).unwrap()).unwrap();
    let archive = dir.path().join("legacy.tar");
    tar_of(&legacy, &archive);
    let img = load(&Source::open(&archive).unwrap(), &amd64(), None).unwrap();
    assert_eq!(img.name.as_deref(), Some("demo:old"));
    assert_eq!(img.layers[0].diff_id, Digest::of(&plain));
    assert_eq!(img.digest, Digest::of(&img.manifest));
    // A layer that is not what the config says is still refused.
    fs::write(legacy.join("abc/layer.tar"), b"not the layer").unwrap();
    tar_of(&legacy, &archive);
    assert!(load(&Source::open(&archive).unwrap(), &amd64(), None).is_err());
}

#[test]
fn oversized_documents_and_non_layouts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = layout(dir.path());
    fs::write(out.join("index.json"), vec![b' '; (MAX_DOCUMENT + 1) as usize]).unwrap();
    let e = load(&Source::open(&out).unwrap(), &amd64(), None).unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    assert!(load(&Source::open(&empty).unwrap(), &amd64(), None)
        .unwrap_err()
        .to_string()
        .contains("not an image layout"));
    let junk = dir.path().join("junk.tar");
    fs::write(&junk, vec![0xffu8; 2048]).unwrap();
    assert!(Source::open(&junk).is_err() || load(&Source::open(&junk).unwrap(), &amd64(), None).is_err());
}
