//! The images of a run ([`list_images`]: a CSV list or a directory) and
//! their reading ahead of the device ([`prefetch`]: decoded and
//! pre-processed in parallel on a second thread, one chunk ahead).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};

use rayon::prelude::*;

use super::files::read_csv;
use super::preprocess::{preprocess, Prepared, Preprocess, SkipReason};
use crate::error::{Error, Result};
use crate::imaging::read_gray;

/// One image of a run: how it is named in the outputs and where it is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageEntry {
    /// The name written to the predictions: the path as given in the list,
    /// or the file name for a directory.
    pub id: String,
    /// The file to read.
    pub path: PathBuf,
}

/// The images of a run and the files of a directory that were passed over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageList {
    /// The images, in list order (directories: sorted by file name).
    pub entries: Vec<ImageEntry>,
    /// Directory entries without a PNG/TIFF extension (not read).
    pub ignored: Vec<PathBuf>,
}

/// The images named by `source`: a directory (its `.png`, `.tif` and
/// `.tiff` files, any case, not recursive, sorted by name), one such image
/// file, or a CSV file
/// with a header holding an `image` column (other columns, e.g. `label`,
/// are ignored, so a labels file serves as a list; relative paths are
/// resolved against the CSV's directory).
///
/// # Errors
/// Unreadable source, a CSV without an `image` column or with a malformed
/// line, or no images at all.
pub fn list_images(source: &Path) -> Result<ImageList> {
    let meta = std::fs::metadata(source).map_err(|e| Error::io(source, e))?;
    let list = if meta.is_dir() {
        let mut list = ImageList::default();
        let rd = std::fs::read_dir(source).map_err(|e| Error::io(source, e))?;
        let mut files = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(source, e))?;
            if entry
                .file_type()
                .map_err(|e| Error::io(entry.path(), e))?
                .is_dir()
            {
                continue;
            }
            files.push(entry.path());
        }
        files.sort();
        for path in files {
            match (
                is_image_name(&path),
                path.file_name().and_then(|n| n.to_str()),
            ) {
                (true, Some(name)) => list.entries.push(ImageEntry {
                    id: name.to_string(),
                    path: path.clone(),
                }),
                _ => list.ignored.push(path),
            }
        }
        list
    } else if is_image_name(source) {
        ImageList {
            entries: vec![ImageEntry {
                id: source
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                path: source.to_path_buf(),
            }],
            ignored: Vec::new(),
        }
    } else {
        let table = read_csv(source)?;
        let col = table
            .column_ignore_case("image")
            .ok_or_else(|| table.error("the header has no `image` column (e.g. `image,label`)"))?;
        let base = source.parent().unwrap_or(Path::new(""));
        let entries = table
            .rows
            .iter()
            .map(|row| {
                let id = row.get(col);
                if id.is_empty() {
                    return Err(table.cell_error(row.line, col, "empty image path"));
                }
                Ok(ImageEntry {
                    id: id.to_string(),
                    path: base.join(id),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        ImageList {
            entries,
            ignored: Vec::new(),
        }
    };
    if list.entries.is_empty() {
        let other = match list.ignored.first() {
            Some(p) => format!(
                "; {} other files such as {} were passed over: only PNG and TIFF are read",
                list.ignored.len(),
                p.display()
            ),
            None => String::new(),
        };
        return Err(Error::format(
            source,
            format!("no images to screen (a directory needs .png/.tif/.tiff files; a list needs rows){other}"),
        ));
    }
    Ok(list)
}

/// True for a `.png`, `.tif` or `.tiff` name, any case.
fn is_image_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .is_some_and(|e| matches!(e.as_str(), "png" | "tif" | "tiff"))
}

/// Reads and pre-processes one image; decoding failures become skips.
fn prepare(entry: &ImageEntry, p: &Preprocess) -> Result<Prepared> {
    match read_gray(&entry.path) {
        Ok(img) => preprocess(&img, p),
        Err(e) => Ok(Prepared::Skipped(SkipReason::Unreadable(e.to_string()))),
    }
}

/// A chunk of read and pre-processed images: (index in the list, the image
/// or why it was left out).
pub type PreparedChunk = Vec<(usize, Result<Prepared>)>;

/// Reads and pre-processes `images` with `p` on a second thread, `chunk`
/// images at a time (each chunk in parallel, one chunk ahead of the
/// consumer), and hands the receiving end to `consume`, which runs on this
/// thread: chunks arrive in list order. When `consume` returns (early, on an
/// error), the reading stops.
pub fn prefetch<T>(
    images: &[ImageEntry],
    chunk: usize,
    p: &Preprocess,
    consume: impl FnOnce(Receiver<PreparedChunk>) -> Result<T>,
) -> Result<T> {
    let bs = chunk.max(1);
    let pre = *p;
    std::thread::scope(|s| {
        let (tx, rx) = sync_channel::<PreparedChunk>(1);
        s.spawn(move || {
            for (c, chunk) in images.chunks(bs).enumerate() {
                let prepared: Vec<_> = chunk
                    .par_iter()
                    .enumerate()
                    .map(|(i, e)| (c * bs + i, prepare(e, &pre)))
                    .collect();
                if tx.send(prepared).is_err() {
                    return; // the consumer stopped on an error
                }
            }
        });
        consume(rx)
    })
}
