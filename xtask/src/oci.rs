//! OCI image layouts of the filter, in the two formats Istio's Wasm image fetcher accepts
//! (istio/istio `pkg/wasm/imagefetcher.go`, spec: solo-io/wasm `spec/`):
//!
//! - **wasm** (the "oci" variant, Wasm artifact media types): config
//!   `application/vnd.module.wasm.config.v1+json` and exactly two layers, that config and the
//!   raw module as `application/vnd.module.wasm.content.layer.v1+wasm`. The module layer's
//!   blob *is* the .wasm, so its digest is the sha256 of the file.
//! - **compat**: an ordinary OCI image with one `application/vnd.oci.image.layer.v1.tar+gzip`
//!   layer holding `plugin.wasm`. Kubernetes can mount this one as an image volume.
//!
//! Every byte is deterministic (sorted JSON keys, tar mtime 0, gzip without name or time), so
//! the same .wasm always gives the same digests and a re-run is a no-op.

use std::fs;
use std::io::Write;
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::Error;

/// Media type of the Wasm runtime config (manifest config and first layer of the artifact).
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.module.wasm.config.v1+json";
/// Media type of the raw module layer.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const IMAGE_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const TAR_GZIP_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The file name Istio looks for in a compat image (and the image volume exposes).
pub const COMPAT_FILE_NAME: &str = "plugin.wasm";

/// One content-addressed blob.
struct Blob {
    media_type: &'static str,
    bytes: Vec<u8>,
    digest: String,
}

impl Blob {
    fn new(media_type: &'static str, bytes: Vec<u8>) -> Self {
        let digest = sha256_hex(&bytes);
        Blob {
            media_type,
            bytes,
            digest,
        }
    }

    fn descriptor(&self) -> Value {
        json!({
            "mediaType": self.media_type,
            "digest": format!("sha256:{}", self.digest),
            "size": self.bytes.len(),
        })
    }

    fn descriptor_titled(&self, title: &str) -> Value {
        let mut d = self.descriptor();
        d["annotations"] = json!({ "org.opencontainers.image.title": title });
        d
    }
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The Proxy-Wasm ABI versions the module exports (`proxy_abi_version_0_2_1` etc.), found by
/// their export names; a module without one is not a Proxy-Wasm filter.
fn abi_versions(wasm: &[u8]) -> Vec<String> {
    const PREFIX: &[u8] = b"proxy_abi_version_";
    let mut found = Vec::new();
    let mut i = 0;
    while let Some(pos) = find(&wasm[i..], PREFIX) {
        let start = i + pos;
        let end = wasm[start..]
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
            .map_or(wasm.len(), |n| start + n);
        let name = String::from_utf8_lossy(&wasm[start..end]).into_owned();
        if !found.contains(&name) {
            found.push(name);
        }
        i = end;
    }
    found.sort();
    found
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A tar+gzip layer with the single regular file `name`, reproducibly.
fn tar_gz_layer(name: &str, contents: &[u8]) -> Result<(Vec<u8>, String), Error> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(contents.len() as u64);
    header.set_mode(0o444);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, name, contents)
        .map_err(|e| Error::io(name, e))?;
    let tar_bytes = tar.into_inner().map_err(|e| Error::io(name, e))?;
    // diff_id: digest of the uncompressed tar, as the image config records it.
    let diff_id = sha256_hex(&tar_bytes);
    // GzBuilder writes mtime 0 and no file name unless asked: stable bytes.
    let mut gz: GzEncoder<Vec<u8>> = GzBuilder::new().write(Vec::new(), Compression::best());
    gz.write_all(&tar_bytes).map_err(|e| Error::io(name, e))?;
    let gz_bytes = gz.finish().map_err(|e| Error::io(name, e))?;
    Ok((gz_bytes, diff_id))
}

fn json_bytes(v: &Value) -> Vec<u8> {
    // serde_json's default map is a BTreeMap: keys come out sorted, the bytes are stable.
    serde_json::to_vec(v).expect("serialising a JSON value cannot fail")
}

/// Writes an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/*`) at `dir` holding
/// `blobs` and one manifest tagged `tag`. Returns the manifest digest (hex).
fn write_layout(dir: &Path, tag: &str, blobs: &[&Blob], manifest: &Value) -> Result<String, Error> {
    if dir.exists() {
        // A layout is rewritten whole: stale blobs of an older build must not linger in it.
        fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let blob_dir = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blob_dir).map_err(|e| Error::io(&blob_dir, e))?;
    let manifest = Blob::new(MANIFEST_MEDIA_TYPE, json_bytes(manifest));
    for blob in blobs.iter().copied().chain(std::iter::once(&manifest)) {
        let path = blob_dir.join(&blob.digest);
        fs::write(&path, &blob.bytes).map_err(|e| Error::io(&path, e))?;
    }
    let mut desc = manifest.descriptor();
    desc["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [desc],
    });
    let index_path = dir.join("index.json");
    fs::write(&index_path, json_bytes(&index)).map_err(|e| Error::io(&index_path, e))?;
    let layout_path = dir.join("oci-layout");
    fs::write(&layout_path, br#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(|e| Error::io(&layout_path, e))?;
    Ok(manifest.digest)
}

/// The digests of one run, as printed (JSON) and written to `<out>/digests.json`.
pub struct Summary {
    json: Value,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_string_pretty(&self.json).map_err(|_| std::fmt::Error)?;
        f.write_str(&s)
    }
}

/// Writes `<out>/wasm` and `<out>/compat` from the module at `wasm_path`.
pub fn write_layouts(wasm_path: &Path, out: &Path, tag: &str) -> Result<Summary, Error> {
    let wasm = fs::read(wasm_path).map_err(|e| Error::io(wasm_path, e))?;
    if !wasm.starts_with(b"\0asm") {
        return Err(Error::Invalid(format!(
            "{} is not a WebAssembly module (no \\0asm magic)",
            wasm_path.display()
        )));
    }
    let abis = abi_versions(&wasm);
    if abis.is_empty() {
        return Err(Error::Invalid(format!(
            "{} exports no proxy_abi_version_*: not a Proxy-Wasm module",
            wasm_path.display()
        )));
    }
    let created_by = format!("edge-filter {} (cargo run -p xtask -- oci)", tag);
    let annotations = json!({
        "org.opencontainers.image.title": "edge-filter",
        "org.opencontainers.image.version": tag,
        "org.opencontainers.image.description": "Proxy-Wasm filter: RFC 9111 response cache, Prometheus metrics, health endpoints",
        "org.opencontainers.image.licenses": "Apache-2.0",
    });

    // --- Wasm artifact variant ---------------------------------------------------------
    let runtime_config = Blob::new(
        WASM_CONFIG_MEDIA_TYPE,
        json_bytes(&json!({
            "type": "envoy_proxy",
            "abiVersions": abis,
            "config": { "root_ids": [] },
        })),
    );
    let module = Blob::new(WASM_LAYER_MEDIA_TYPE, wasm.clone());
    let artifact_manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": runtime_config.descriptor(),
        // Istio wants exactly two layers here: the runtime config and the module.
        "layers": [
            runtime_config.descriptor_titled("runtime-config.json"),
            module.descriptor_titled(COMPAT_FILE_NAME),
        ],
        "annotations": annotations,
    });
    let wasm_dir = out.join("wasm");
    let artifact_digest = write_layout(
        &wasm_dir,
        tag,
        &[&runtime_config, &module],
        &artifact_manifest,
    )?;

    // --- compat variant ------------------------------------------------------------------
    let (layer_bytes, diff_id) = tar_gz_layer(COMPAT_FILE_NAME, &wasm)?;
    let layer = Blob::new(TAR_GZIP_MEDIA_TYPE, layer_bytes);
    let image_config = Blob::new(
        IMAGE_CONFIG_MEDIA_TYPE,
        json_bytes(&json!({
            // The module is platform-neutral; linux/amd64 is what runtimes expect to see.
            "architecture": "amd64",
            "os": "linux",
            "config": { "Labels": annotations },
            "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
            "history": [{ "created_by": created_by }],
        })),
    );
    let compat_manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": image_config.descriptor(),
        "layers": [layer.descriptor()],
        "annotations": annotations,
    });
    let compat_dir = out.join("compat");
    let compat_digest = write_layout(&compat_dir, tag, &[&image_config, &layer], &compat_manifest)?;

    let json = json!({
        "tag": tag,
        "wasm": { "path": wasm_path.display().to_string(), "size": wasm.len(), "sha256": module.digest },
        "abi_versions": abi_versions(&wasm),
        "artifact": {
            "layout": wasm_dir.display().to_string(),
            "manifest_digest": format!("sha256:{artifact_digest}"),
        },
        "compat": {
            "layout": compat_dir.display().to_string(),
            "manifest_digest": format!("sha256:{compat_digest}"),
            "layer_digest": format!("sha256:{}", layer.digest),
        },
    });
    let digests = out.join("digests.json");
    fs::write(&digests, json_bytes(&json)).map_err(|e| Error::io(&digests, e))?;
    Ok(Summary { json })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn fake_module() -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        m.extend_from_slice(b"....proxy_abi_version_0_2_1\x00..proxy_on_memory_allocate");
        m
    }

    fn blob(dir: &Path, digest: &str) -> Vec<u8> {
        let hex = digest.trim_start_matches("sha256:");
        fs::read(dir.join("blobs/sha256").join(hex)).unwrap()
    }

    fn manifest_of(dir: &Path) -> Value {
        let index: Value =
            serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
        let digest = index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let bytes = blob(dir, &digest);
        assert_eq!(sha256_hex(&bytes), digest.trim_start_matches("sha256:"));
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn abi_versions_are_found_by_export_name() {
        assert_eq!(abi_versions(&fake_module()), ["proxy_abi_version_0_2_1"]);
        assert!(abi_versions(b"\0asm\x01\0\0\0nothing").is_empty());
    }

    #[test]
    fn layouts_hold_the_module_in_both_formats_and_are_reproducible() {
        let tmp = std::env::temp_dir().join(format!("xtask-oci-{}", std::process::id()));
        let wasm_path = tmp.join("m.wasm");
        fs::create_dir_all(&tmp).unwrap();
        fs::write(&wasm_path, fake_module()).unwrap();

        let first = write_layouts(&wasm_path, &tmp.join("a"), "1.2.3")
            .unwrap()
            .json;
        let second = write_layouts(&wasm_path, &tmp.join("b"), "1.2.3")
            .unwrap()
            .json;
        assert_eq!(
            first["artifact"]["manifest_digest"],
            second["artifact"]["manifest_digest"]
        );
        assert_eq!(
            first["compat"]["manifest_digest"],
            second["compat"]["manifest_digest"]
        );

        // Artifact: two layers, the second is the module byte for byte.
        let m = manifest_of(&tmp.join("a/wasm"));
        assert_eq!(m["config"]["mediaType"], WASM_CONFIG_MEDIA_TYPE);
        let layers = m["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[1]["mediaType"], WASM_LAYER_MEDIA_TYPE);
        let module = blob(&tmp.join("a/wasm"), layers[1]["digest"].as_str().unwrap());
        assert_eq!(module, fake_module());

        // Compat: one tar+gzip layer whose only entry is plugin.wasm.
        let m = manifest_of(&tmp.join("a/compat"));
        let layers = m["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0]["mediaType"], TAR_GZIP_MEDIA_TYPE);
        let gz = blob(&tmp.join("a/compat"), layers[0]["digest"].as_str().unwrap());
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&gz[..]));
        let mut entries = archive.entries().unwrap();
        let mut entry = entries.next().unwrap().unwrap();
        assert_eq!(entry.path().unwrap().to_str(), Some(COMPAT_FILE_NAME));
        let mut contents = Vec::new();
        entry.read_to_end(&mut contents).unwrap();
        assert_eq!(contents, fake_module());
        drop(entry);
        assert!(entries.next().is_none());

        // The image config's diff_id is the digest of the uncompressed tar.
        let config: Value = serde_json::from_slice(&blob(
            &tmp.join("a/compat"),
            m["config"]["digest"].as_str().unwrap(),
        ))
        .unwrap();
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut tar_bytes)
            .unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            format!("sha256:{}", sha256_hex(&tar_bytes))
        );
        fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn a_non_wasm_file_is_refused() {
        let tmp = std::env::temp_dir().join(format!("xtask-oci-bad-{}", std::process::id()));
        fs::create_dir_all(&tmp).unwrap();
        let p = tmp.join("x.wasm");
        fs::write(&p, b"not wasm").unwrap();
        assert!(matches!(
            write_layouts(&p, &tmp.join("o"), "t"),
            Err(Error::Invalid(_))
        ));
        fs::remove_dir_all(&tmp).unwrap();
    }
}
