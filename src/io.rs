//! Reading and writing safetensors files: model weights under their PyTorch
//! `state_dict` names, and named input/output tensors for the command line.
//!
//! Errors name the file and the tensor: a missing key, a wrong shape or
//! dtype, a truncated or corrupt file.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors, View};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::tensor::{Element, Tensor};

/// A safetensors file read into memory, with its header validated.
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
    header_len: usize,
    meta: Metadata,
}

impl std::fmt::Debug for TensorFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TensorFile({}, {} tensors)",
            self.path.display(),
            self.len()
        )
    }
}

impl TensorFile {
    /// Reads and validates `path` (header, offsets, file length).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, bytes)
    }

    /// Parses an in-memory file; `path` is used in error messages.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self> {
        let path = path.as_ref();
        let (header_len, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| {
            Error::format(
                path,
                format!(
                    "not a valid safetensors file ({} bytes; truncated or corrupt?): {e}",
                    bytes.len()
                ),
            )
        })?;
        Ok(TensorFile {
            path: path.to_path_buf(),
            bytes,
            header_len,
            meta,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.meta.tensors().len()
    }

    /// True when the file holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.meta.tensors().into_keys().collect();
        v.sort();
        v
    }

    /// True when a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.meta.info(name).is_some()
    }

    /// The shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.meta.info(name).map(|i| i.shape.as_slice())
    }

    /// The dtype of `name`, if present.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.meta.info(name).map(|i| i.dtype)
    }

    /// The shape and dtype of `name`, or an error naming the file and the
    /// missing tensor (with similar names, if any).
    pub fn require(&self, name: &str) -> Result<(&[usize], Dtype)> {
        self.info(name).map(|i| (i.shape.as_slice(), i.dtype))
    }

    /// The free-form string metadata of the file (`__metadata__`).
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.meta.metadata().as_ref()
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.meta.info(name).ok_or_else(|| {
            let mut near: Vec<String> = self
                .names()
                .into_iter()
                .filter(|n| {
                    let stem = name.rsplit_once('.').map_or(name, |(a, _)| a);
                    n.starts_with(stem)
                })
                .take(5)
                .collect();
            near.sort();
            let hint = if near.is_empty() {
                String::new()
            } else {
                format!(" (similar: {})", near.join(", "))
            };
            Error::format(&self.path, format!("missing tensor {name:?}{hint}"))
        })
    }

    fn raw(&self, info: &TensorInfo) -> &[u8] {
        let start = 8 + self.header_len;
        let (a, b) = info.data_offsets;
        &self.bytes[start + a..start + b]
    }

    /// Reads `name` as f32 values (f32, f64, f16 and bf16 are converted);
    /// returns (shape, data).
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.info(name)?;
        let raw = self.raw(info);
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    f64::from_le_bytes(b) as f32
                })
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::format(
                    &self.path,
                    format!(
                        "tensor {name:?} has dtype {other:?}; a floating-point tensor is needed"
                    ),
                ))
            }
        };
        Ok((info.shape.clone(), data))
    }

    /// Reads `name` as i64 values (any integer dtype is widened); returns
    /// (shape, data).
    pub fn i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let info = self.info(name)?;
        let raw = self.raw(info);
        let data: Vec<i64> = match info.dtype {
            Dtype::I64 => raw
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    i64::from_le_bytes(b)
                })
                .collect(),
            Dtype::I32 => raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            Dtype::U32 => raw
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            Dtype::U8 => raw.iter().map(|&b| b as i64).collect(),
            other => {
                return Err(Error::format(
                    &self.path,
                    format!("tensor {name:?} has dtype {other:?}; an integer tensor is needed"),
                ))
            }
        };
        Ok((info.shape.clone(), data))
    }

    /// Reads `name` onto `be`'s device as f32, checking its shape when
    /// `expected` is given.
    pub fn tensor(&self, be: &Backend, name: &str, expected: Option<&[usize]>) -> Result<Tensor> {
        let (shape, data) = self.f32(name)?;
        if let Some(exp) = expected {
            if exp != shape.as_slice() {
                return Err(Error::format(
                    &self.path,
                    format!("tensor {name:?} has shape {shape:?}, expected {exp:?}"),
                ));
            }
        }
        Tensor::from_vec(be, &shape, data)
    }

    /// Reads `name` with exactly `shape` (the common case for model weights).
    pub fn expect(&self, be: &Backend, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.tensor(be, name, Some(shape))
    }
}

struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Entry {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Collects named tensors and writes them as one safetensors file.
#[derive(Default)]
pub struct TensorWriter {
    entries: BTreeMap<String, Entry>,
    metadata: HashMap<String, String>,
}

impl TensorWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds host data of any element type under `name`.
    pub fn add_slice<T: Element>(&mut self, name: &str, shape: &[usize], data: &[T]) -> Result<()> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::invalid(format!(
                "output {name:?}: shape {shape:?} needs {n} values, got {}",
                data.len()
            )));
        }
        self.entries.insert(
            name.to_string(),
            Entry {
                dtype: T::DTYPE,
                shape: shape.to_vec(),
                bytes: bytemuck::cast_slice(data).to_vec(),
            },
        );
        Ok(())
    }

    /// Adds a tensor (copied to the host) under `name`.
    pub fn add<T: Element>(&mut self, name: &str, t: &Tensor<T>) -> Result<()> {
        let data = t.to_vec()?;
        self.add_slice(name, t.shape(), &data)
    }

    /// Sets a string metadata entry.
    pub fn set_metadata(&mut self, key: &str, value: &str) {
        self.metadata.insert(key.to_string(), value.to_string());
    }

    /// Writes the file: first to a temporary file beside it, then renamed into
    /// place, so a failure never leaves a half-written file or destroys an
    /// existing one.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self
            .serialize()
            .map_err(|e| Error::format(path, format!("serializing tensors: {e}")))?;
        write_atomic(path, &bytes)
    }

    /// The safetensors bytes [`TensorWriter::write`] would write (e.g. to
    /// reopen them with [`TensorFile::from_bytes`] without touching disk).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.serialize()
            .map_err(|e| Error::invalid(format!("serializing tensors: {e}")))
    }

    /// The file's bytes. `safetensors::serialize` writes the metadata map in
    /// its hash order, which changes from process to process; the header is
    /// rewritten here with every key sorted, so the same tensors and
    /// metadata always give the same bytes.
    fn serialize(&self) -> std::result::Result<Vec<u8>, safetensors::SafeTensorError> {
        let meta = (!self.metadata.is_empty()).then(|| self.metadata.clone());
        let bytes =
            safetensors::serialize(self.entries.iter().map(|(k, v)| (k.as_str(), v)), meta)?;
        Ok(sorted_header(bytes).unwrap_or_else(|original| original))
    }
}

/// `bytes` (a safetensors file) with its JSON header's keys sorted at every
/// level and padded with spaces to a multiple of 8 bytes, the data
/// unchanged; the input back when its header does not parse (never the case
/// for what `safetensors::serialize` writes).
fn sorted_header(bytes: Vec<u8>) -> std::result::Result<Vec<u8>, Vec<u8>> {
    fn to_sorted_json(v: &serde_json::Value) -> Option<String> {
        // serde_json's map keeps insertion order under some feature sets:
        // the keys go through a BTreeMap either way.
        match v {
            serde_json::Value::Object(m) => {
                let mut out = String::from("{");
                let sorted: BTreeMap<&String, &serde_json::Value> = m.iter().collect();
                for (i, (k, v)) in sorted.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).ok()?);
                    out.push(':');
                    out.push_str(&to_sorted_json(v)?);
                }
                out.push('}');
                Some(out)
            }
            other => serde_json::to_string(other).ok(),
        }
    }
    let Some(len) = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .and_then(|n| usize::try_from(n).ok())
    else {
        return Err(bytes);
    };
    let Some(header) = bytes.get(8..8 + len) else {
        return Err(bytes);
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(header) else {
        return Err(bytes);
    };
    let Some(mut json) = to_sorted_json(&value) else {
        return Err(bytes);
    };
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - len);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(&bytes[8 + len..]);
    Ok(out)
}

/// Writes `bytes` to `path` atomically: into a uniquely named hidden
/// temporary file in the same directory (`.<name>.XXXXXX.tmp`, so two
/// writers of one path never share it), flushed to disk (`sync_all`), then
/// renamed over `path`; on unix the directory is then synced too (best
/// effort). Readers see either the old file or the whole new one.
///
/// The file gets the permissions a plain create would (`0o666` less the
/// umask on unix), not the temporary file's usual `0o600`.
///
/// # Errors
/// Any failure — the directory is missing or read-only, the disk is full,
/// the rename is refused — names `path` (never the temporary name), removes
/// the temporary file and leaves an existing file at `path` untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;

    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} is not a file path", path.display())))?;
    let prefix = format!(".{}.", name.to_string_lossy());
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let fail = |e: std::io::Error| Error::io(path, without_temp_path(e));
    // Dropping `tmp` on any error below removes the temporary file.
    let mut tmp = builder.tempfile_in(dir).map_err(fail)?;
    tmp.as_file_mut().write_all(bytes).map_err(fail)?;
    tmp.as_file().sync_all().map_err(fail)?;
    tmp.persist(path).map_err(|e| fail(e.error))?;
    #[cfg(unix)]
    {
        // The rename is durable once the directory is synced; a directory
        // that cannot be opened or synced does not undo the write.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Refuses an output that would overwrite one of the command's inputs:
/// `output` (given as flag `output_flag`) is compared with every `(flag,
/// path)` of `inputs` after resolving links and `.`/`..` (an output that does
/// not exist yet is resolved through its folder), and on unix also by
/// device and inode, so a hard link or another spelling of an input is
/// caught too. Inputs that do not exist are skipped (reading them fails
/// later with their own error). Commands call it before any work, so it
/// also fails fast when the folder that would hold `output` does not exist
/// (see [`check_output_folder`]).
///
/// # Errors
/// [`Error::Invalid`] naming both flags and paths, or the missing folder.
pub fn check_output_is_not_an_input(
    output_flag: &str,
    output: &Path,
    inputs: &[(&str, &Path)],
) -> Result<()> {
    check_output_folder(output_flag, output)?;
    let out = resolve_for_writing(output);
    let out_id = file_id(output);
    for (flag, input) in inputs {
        let Ok(inp) = std::fs::canonicalize(input) else {
            continue;
        };
        let same_id = out_id.is_some() && out_id == file_id(input);
        if out.as_deref() == Some(inp.as_path()) || same_id {
            return Err(Error::invalid(format!(
                "{output_flag} {} is the input given as {flag} {}; writing it would destroy the input — choose another output path",
                output.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// Fails fast, before any long work, when the folder that would hold the
/// output file `output` (given as `output_flag`) does not exist or is not
/// a folder.
///
/// # Errors
/// [`Error::Invalid`] naming the flag, the output and the folder.
pub fn check_output_folder(output_flag: &str, output: &Path) -> Result<()> {
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        let what = if dir.exists() {
            "is not a folder"
        } else {
            "does not exist (create it first)"
        };
        return Err(Error::invalid(format!(
            "{output_flag} {}: the folder {} {what}",
            output.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// The marker file that [`OutputFolder`] keeps in a folder it writes.
pub const RUN_MARKER: &str = ".cellmorph-run.json";

/// What [`RUN_MARKER`] records: the run's description (command and the
/// options that decide its files) and whether it finished.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct RunMarker {
    run: String,
    complete: bool,
}

/// A folder that one run of a command writes several files into (`demo
/// --out`, `synth --out`, `--plots`, `--cam-dir`, a folder of images).
///
/// [`OutputFolder::claim`] refuses a non-empty folder written by another
/// run (or by no cellmorph run at all) unless forced, and records the run in
/// the folder's [`RUN_MARKER`] as incomplete; [`OutputFolder::finish`] marks
/// it complete. So a killed run leaves its folder marked incomplete, the
/// same run may be repeated into its own folder (it resumes by overwriting),
/// and two different runs never both succeed into one folder leaving a mix.
/// A forced run replaces files of the same names and leaves others alone;
/// the marker then names the forced run. A folder holding nothing but a
/// marker counts as empty. A run that fails with an error before writing
/// any file removes its marker again (and the folder, if it created it).
#[derive(Debug)]
pub struct OutputFolder {
    path: PathBuf,
    flag: String,
    run: String,
    created: bool,
    finished: bool,
}

impl OutputFolder {
    /// Creates `dir` (given as flag `flag`) if needed and claims it for the
    /// run described by `run`.
    ///
    /// # Errors
    /// `dir` is an existing file; the folder holds files and its marker
    /// names another run or is missing (unless `force`); the folder or the
    /// marker cannot be written. Every error names the flag and the path.
    pub fn claim(flag: &str, dir: &Path, run: &str, force: bool) -> Result<OutputFolder> {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::invalid(format!(
                "{flag} {}: exists and is not a folder; give a folder path (it is created if missing)",
                dir.display()
            )));
        }
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::invalid(format!(
                "{flag} {}: cannot create the folder: {e}",
                dir.display()
            ))
        })?;
        let mut folder = OutputFolder {
            path: dir.to_path_buf(),
            flag: flag.to_string(),
            run: run.to_string(),
            created,
            finished: true,
        };
        let marker = dir.join(RUN_MARKER);
        let others = folder.files_besides_marker()?;
        let mine = RunMarker {
            run: run.to_string(),
            complete: false,
        };
        if others == 0 && !marker.exists() {
            // An empty folder: claim it with a marker created exclusively, so
            // of two runs started together only one gets it.
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&marker)
            {
                Ok(mut f) => {
                    use std::io::Write as _;
                    folder.finished = false;
                    f.write_all(folder.marker_text(&mine)?.as_bytes())
                        .map_err(|e| Error::io(&marker, e))?;
                    return Ok(folder);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(&marker, e)),
            }
        }
        let previous: Option<RunMarker> = std::fs::read_to_string(&marker)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        match previous {
            _ if others == 0 => {}
            Some(p) if p.run == run => {}
            _ if force => {}
            Some(p) => {
                return Err(Error::invalid(format!(
                    "{flag} {} holds the files of another run ({}: {}); pass --force to write into it anyway, or choose a new or empty folder",
                    dir.display(),
                    if p.complete { "complete" } else { "incomplete" },
                    p.run
                )))
            }
            None => {
                return Err(Error::invalid(format!(
                    "{flag} {} is not empty and was not written by this command (no readable {RUN_MARKER}); pass --force to write into it anyway, or choose a new or empty folder",
                    dir.display()
                )))
            }
        }
        write_atomic(&marker, folder.marker_text(&mine)?.as_bytes())?;
        folder.finished = false;
        Ok(folder)
    }

    /// Entries of the folder other than the marker.
    fn files_besides_marker(&self) -> Result<usize> {
        Ok(std::fs::read_dir(&self.path)
            .map_err(|e| Error::io(&self.path, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name() != RUN_MARKER)
            .count())
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks the run complete in the folder's marker.
    ///
    /// # Errors
    /// The marker cannot be written (the error names it).
    pub fn finish(mut self) -> Result<()> {
        let done = RunMarker {
            run: self.run.clone(),
            complete: true,
        };
        self.finished = true;
        write_atomic(
            &self.path.join(RUN_MARKER),
            self.marker_text(&done)?.as_bytes(),
        )
    }

    fn marker_text(&self, m: &RunMarker) -> Result<String> {
        serde_json::to_string_pretty(m)
            .map_err(|e| Error::invalid(format!("{} marker: {e}", self.flag)))
    }
}

impl Drop for OutputFolder {
    /// A run that ends without [`OutputFolder::finish`] and wrote nothing
    /// takes its marker (and the folder it created) away again; one that
    /// wrote files leaves them marked incomplete.
    fn drop(&mut self) {
        if self.finished || !matches!(self.files_besides_marker(), Ok(0)) {
            return;
        }
        let _ = std::fs::remove_file(self.path.join(RUN_MARKER));
        if self.created {
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

/// `path` with its folder resolved (the file itself need not exist).
fn resolve_for_writing(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = std::fs::canonicalize(path) {
        return Some(p);
    }
    let name = path.file_name()?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Some(std::fs::canonicalize(dir).ok()?.join(name))
}

/// Device and inode of an existing file (unix); `None` elsewhere or when
/// the file does not exist.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// `tempfile` adds ` at path "<temporary file>"` to its errors; the caller
/// names the user's path instead, so the hidden temporary name is cut off.
fn without_temp_path(e: std::io::Error) -> std::io::Error {
    if e.raw_os_error().is_some() || e.get_ref().is_none() {
        return e;
    }
    let text = e.to_string();
    match text.rsplit_once(" at path \"") {
        Some((message, _)) => std::io::Error::new(e.kind(), message.to_string()),
        None => e,
    }
}

/// The metadata key of a seeded file: JSON `{"seed": S, "tensors": {name:
/// {"shape": [...], "bound": b}}}`.
pub const SEEDED_KEY: &str = "seeded";

/// Largest number of values [`expand_seeded`] draws for one file (1 GiB of
/// f32), whatever its metadata claims.
pub const SEEDED_MAX_VALUES: usize = 1 << 28;

/// The bytes of the complete safetensors file that the seeded file at
/// `path` stands for: every tensor its metadata key [`SEEDED_KEY`] lists is
/// drawn by [`crate::rng::seeded_tensor`] (f32) and added to the tensors it
/// stores; the key itself is dropped. The repository keeps paper-size
/// fixtures this way (`scripts/fixtures/paper.py` writes them).
pub fn expand_seeded(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    #[derive(serde::Deserialize)]
    struct Spec {
        seed: u64,
        tensors: BTreeMap<String, One>,
    }
    #[derive(serde::Deserialize)]
    struct One {
        shape: Vec<usize>,
        bound: f32,
    }
    let path = path.as_ref();
    let file = TensorFile::open(path)?;
    let mut meta = file.metadata().cloned().unwrap_or_default();
    let text = meta.remove(SEEDED_KEY).ok_or_else(|| {
        Error::format(
            path,
            format!("no {SEEDED_KEY:?} metadata: not a seeded file"),
        )
    })?;
    let spec: Spec = serde_json::from_str(&text)
        .map_err(|e| Error::format(path, format!("metadata {SEEDED_KEY:?}: {e}")))?;
    let mut total = 0usize;
    let mut drawn = Vec::with_capacity(spec.tensors.len());
    for (name, one) in &spec.tensors {
        if file.contains(name) {
            return Err(Error::format(
                path,
                format!("tensor {name:?} is both stored and seeded"),
            ));
        }
        let n = one
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= SEEDED_MAX_VALUES - total)
            .ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "seeded tensor {name:?} of shape {:?} would exceed {SEEDED_MAX_VALUES} values in all",
                        one.shape
                    ),
                )
            })?;
        if !one.bound.is_finite() {
            return Err(Error::format(
                path,
                format!("seeded tensor {name:?}: bound {} is not finite", one.bound),
            ));
        }
        total += n;
        let values = crate::rng::seeded_tensor(spec.seed, name, n, one.bound);
        drawn.push(Entry {
            dtype: Dtype::F32,
            shape: one.shape.clone(),
            bytes: bytemuck::cast_slice(&values).to_vec(),
        });
    }
    let stored = SafeTensors::deserialize(&file.bytes)
        .map_err(|e| Error::format(path, format!("reading tensors: {e}")))?;
    let mut views: Vec<(String, Entry)> = stored
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let entry = Entry {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                bytes: v.data().to_vec(),
            };
            (name, entry)
        })
        .collect();
    views.extend(spec.tensors.keys().cloned().zip(drawn));
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = (!meta.is_empty()).then_some(meta);
    safetensors::serialize(views.iter().map(|(k, v)| (k.as_str(), v)), meta)
        .map_err(|e| Error::format(path, format!("serializing tensors: {e}")))
}
