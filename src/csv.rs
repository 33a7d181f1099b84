//! CSV files, read and written one way for the whole crate (numeric tables,
//! CP2Image feature tables, the screening's predictions, labels and image
//! lists, sample lists), on the `csv` crate.
//!
//! Reading ([`CsvFile`]):
//! - a UTF-8 byte-order mark at the start is dropped;
//! - fields may be quoted (`"a,b"`; `""` inside quotes is one quote), and a
//!   quoted field may span lines; a quote opens a quoted field only as the
//!   field's first character;
//! - lines end in `\n` or `\r\n`;
//! - surrounding blanks are trimmed from every field;
//! - lines starting with `#` are comments, kept apart ([`CsvFile::comments`]);
//!   blank lines are skipped;
//! - the first record is the header; rows may have any number of fields
//!   (each reader checks what its format needs).
//!
//! Every error names the file and, where there is one, the line and the
//! column: `samples.csv: line 3, column "image": …` ([`CsvFile::cell_error`],
//! [`CsvFile::line_error`]).
//!
//! Writing ([`CsvWriter`]): `\n` line ends, and a field is quoted only when
//! it must be: when it holds a comma, a quote, a line break or a `#` (so no
//! field can be read back as a comment, also by `pandas.read_csv(...,
//! comment="#")`). Numbers are formatted by the caller.

use std::path::{Path, PathBuf};

use crate::io::write_atomic;
use crate::{Error, Result};

/// One record of a CSV file: its fields and the line it starts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Line number (1-based) of the record's first character.
    pub line: usize,
    /// Fields, unquoted and trimmed.
    pub fields: Vec<String>,
}

impl Record {
    /// Field `i`, or `""` past the end of a short row.
    pub fn get(&self, i: usize) -> &str {
        self.fields.get(i).map_or("", String::as_str)
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// True when the record has no field.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

/// A comment line (`# …`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comment {
    /// Line number (1-based).
    pub line: usize,
    /// The text after the `#`, with surrounding blanks trimmed.
    pub text: String,
}

/// A CSV file read whole (see the module documentation).
#[derive(Clone, Debug, PartialEq)]
pub struct CsvFile {
    origin: PathBuf,
    /// Comment lines, in file order.
    pub comments: Vec<Comment>,
    /// The first record.
    pub header: Record,
    /// Every record after the header, in file order.
    pub rows: Vec<Record>,
}

impl CsvFile {
    /// Reads and parses `path`.
    ///
    /// # Errors
    /// An unreadable file, text that is not UTF-8 (naming the line), or a
    /// parse error ([`CsvFile::parse`]).
    pub fn read(path: impl AsRef<Path>) -> Result<CsvFile> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let line = 1 + bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            Error::format(path, format!("line {line}: not UTF-8 text"))
        })?;
        CsvFile::parse(text, path)
    }

    /// Parses CSV text; `origin` names the source in error messages.
    ///
    /// # Errors
    /// No header (an empty file, or only comments and blank lines), or a
    /// quoted field left open at the end of the file.
    pub fn parse(text: &str, origin: impl AsRef<Path>) -> Result<CsvFile> {
        let origin = origin.as_ref().to_path_buf();
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let bytes = text.as_bytes();
        let mut reader = ::csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .trim(::csv::Trim::All)
            .comment(Some(b'#'))
            .from_reader(bytes);
        let mut record = ::csv::StringRecord::new();
        let mut comments = Vec::new();
        let mut records: Vec<Record> = Vec::new();
        // Each read consumes the blank and comment lines before a record,
        // then the record; `pos` is where the next read starts, on `line`.
        let (mut pos, mut line) = (0usize, 1usize);
        loop {
            let more = reader.read_record(&mut record).map_err(|e| {
                // Reading text from memory can only fail on bad UTF-8,
                // which `read` has ruled out; name the place all the same.
                let at = e.position().map_or(line, |p| p.line() as usize);
                Error::format(&origin, format!("line {at}: {e}"))
            })?;
            let end = if more {
                (reader.position().byte() as usize).min(bytes.len())
            } else {
                bytes.len()
            };
            let mut p = pos;
            while p < end {
                match bytes[p] {
                    b'\n' => {
                        line += 1;
                        p += 1;
                    }
                    b'\r' => p += 1,
                    b'#' => {
                        let eol = bytes[p..end]
                            .iter()
                            .position(|&b| b == b'\n')
                            .map_or(end, |k| p + k);
                        comments.push(Comment {
                            line,
                            text: text[p + 1..eol].trim().to_string(),
                        });
                        p = eol;
                    }
                    _ => break,
                }
            }
            if !more {
                break;
            }
            let raw = &bytes[p..end];
            let start = line;
            line += raw.iter().filter(|&&b| b == b'\n').count();
            pos = end;
            let fields: Vec<String> = record.iter().map(str::to_string).collect();
            if end == bytes.len() {
                if let Some(field) = open_quote(raw) {
                    let at = Record {
                        line: start,
                        fields: Vec::new(),
                    };
                    let file = CsvFile {
                        origin,
                        comments,
                        header: records.first().cloned().unwrap_or(at),
                        rows: Vec::new(),
                    };
                    let msg = "unterminated quote: the field runs to the end of the file";
                    return Err(if records.is_empty() {
                        file.line_error(start, format!("field {}: {msg}", field + 1))
                    } else {
                        file.cell_error(start, field, msg)
                    });
                }
            }
            // A line of blanks is one empty field: a blank line.
            if fields.len() == 1 && fields[0].is_empty() {
                continue;
            }
            records.push(Record {
                line: start,
                fields,
            });
        }
        let mut records = records.into_iter();
        let header = records
            .next()
            .ok_or_else(|| Error::format(&origin, "empty file: no header row"))?;
        Ok(CsvFile {
            origin,
            comments,
            header,
            rows: records.collect(),
        })
    }

    /// The path (or other origin) the file was read from.
    pub fn path(&self) -> &Path {
        &self.origin
    }

    /// Index of the header column called `name` (exact match).
    pub fn column(&self, name: &str) -> Option<usize> {
        self.header.fields.iter().position(|h| h == name)
    }

    /// Index of the header column called `name`, ignoring ASCII case.
    pub fn column_ignore_case(&self, name: &str) -> Option<usize> {
        self.header
            .fields
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
    }

    /// How a column is named in messages: `"name"` from the header, or its
    /// 1-based number when the header has no name for it.
    pub fn column_label(&self, col: usize) -> String {
        match self.header.fields.get(col) {
            Some(name) if !name.is_empty() => format!("{name:?}"),
            _ => (col + 1).to_string(),
        }
    }

    /// An error about the whole file: `<file>: <msg>`.
    pub fn error(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(&self.origin, msg.to_string())
    }

    /// An error about one line: `<file>: line <line>: <msg>`.
    pub fn line_error(&self, line: usize, msg: impl std::fmt::Display) -> Error {
        Error::format(&self.origin, format!("line {line}: {msg}"))
    }

    /// An error about one cell: `<file>: line <line>, column "<name>": <msg>`
    /// (see [`CsvFile::column_label`]).
    pub fn cell_error(&self, line: usize, col: usize, msg: impl std::fmt::Display) -> Error {
        Error::format(
            &self.origin,
            format!("line {line}, column {}: {msg}", self.column_label(col)),
        )
    }

    /// The error for a row whose number of fields is not the header's.
    pub fn width_error(&self, row: &Record) -> Error {
        self.line_error(
            row.line,
            format!(
                "{} fields, but the header has {}",
                row.len(),
                self.header.len()
            ),
        )
    }

    /// Fails with [`CsvFile::width_error`] unless `row` has as many fields
    /// as the header.
    pub fn check_width(&self, row: &Record) -> Result<()> {
        if row.len() == self.header.len() {
            Ok(())
        } else {
            Err(self.width_error(row))
        }
    }

    /// Fails when a header name from column `from` on is used twice,
    /// naming the column and both positions.
    pub fn check_unique_header(&self, from: usize) -> Result<()> {
        let mut seen = std::collections::HashMap::new();
        for (i, name) in self.header.fields.iter().enumerate().skip(from) {
            if let Some(first) = seen.insert(name.as_str(), i) {
                return Err(self.cell_error(
                    self.header.line,
                    i,
                    format!(
                        "duplicate column name (columns {} and {})",
                        first + 1,
                        i + 1
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Cell `col` of `row` as a finite number.
    ///
    /// # Errors
    /// A cell that is not a number, or is NaN or infinite, named by line
    /// and column.
    pub fn number(&self, row: &Record, col: usize) -> Result<f64> {
        let cell = row.get(col);
        let v: f64 = cell
            .parse()
            .map_err(|_| self.cell_error(row.line, col, format!("{cell:?} is not a number")))?;
        if v.is_finite() {
            Ok(v)
        } else {
            Err(self.cell_error(
                row.line,
                col,
                format!("{cell:?} is not finite (non-finite values, NaN and infinities, are not accepted)"),
            ))
        }
    }
}

/// The field (0-based) whose opening quote is never closed in `raw`, the
/// text of the file's last record, or `None`. Mirrors the reader: a quote
/// opens a quoted field only as the field's first byte.
fn open_quote(raw: &[u8]) -> Option<usize> {
    let (mut field, mut at_start, mut quoted) = (0, true, false);
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if quoted {
            if b == b'"' {
                if raw.get(i + 1) == Some(&b'"') {
                    i += 1;
                } else {
                    quoted = false;
                }
            }
        } else if b == b'"' && at_start {
            quoted = true;
        } else if b == b',' {
            field += 1;
            at_start = true;
            i += 1;
            continue;
        } else if b == b'\n' || b == b'\r' {
            return None;
        }
        at_start = false;
        i += 1;
    }
    quoted.then_some(field)
}

/// Writes CSV text in memory (see the module documentation), then to a
/// file atomically ([`CsvWriter::write`]).
pub struct CsvWriter {
    inner: ::csv::Writer<Vec<u8>>,
}

impl Default for CsvWriter {
    fn default() -> Self {
        CsvWriter::new()
    }
}

impl std::fmt::Debug for CsvWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CsvWriter")
    }
}

// Writing into a `Vec` cannot fail, and the writer is flexible (records of
// any length), so the csv crate has no error to report.
const IN_MEMORY: &str = "writing CSV into memory cannot fail";

impl CsvWriter {
    /// An empty document.
    pub fn new() -> Self {
        CsvWriter {
            inner: Self::writer_on(Vec::new()),
        }
    }

    fn writer_on(bytes: Vec<u8>) -> ::csv::Writer<Vec<u8>> {
        ::csv::WriterBuilder::new()
            .flexible(true)
            .terminator(::csv::Terminator::Any(b'\n'))
            .quote_style(::csv::QuoteStyle::Necessary)
            .comment(Some(b'#'))
            .from_writer(bytes)
    }

    fn take_bytes(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.inner, Self::writer_on(Vec::new()))
            .into_inner()
            .expect(IN_MEMORY)
    }

    /// Appends the comment line `# <text>` (line breaks in `text` become
    /// spaces).
    pub fn comment(&mut self, text: &str) {
        let mut bytes = self.take_bytes();
        bytes.extend_from_slice(b"# ");
        bytes.extend_from_slice(text.replace(['\n', '\r'], " ").as_bytes());
        bytes.push(b'\n');
        self.inner = Self::writer_on(bytes);
    }

    /// Appends one record.
    pub fn record<I, T>(&mut self, fields: I)
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        /// A `str` field as the bytes the csv crate takes.
        struct Field<T>(T);
        impl<T: AsRef<str>> AsRef<[u8]> for Field<T> {
            fn as_ref(&self) -> &[u8] {
                self.0.as_ref().as_bytes()
            }
        }
        self.inner
            .write_record(fields.into_iter().map(Field))
            .expect(IN_MEMORY);
    }

    /// The text written so far.
    pub fn into_string(mut self) -> String {
        let bytes = self.take_bytes();
        // Every field and comment came in as `str`, so this is UTF-8.
        String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into())
    }

    /// Writes the text to `path` atomically ([`write_atomic`]).
    pub fn write(self, path: &Path) -> Result<()> {
        write_atomic(path, self.into_string().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CsvFile> {
        CsvFile::parse(text, "t.csv")
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn quotes_crlf_bom_comments_and_blank_lines() {
        let f = parse(
            "\u{feff}# run: 1\r\nid, \"a,b\" ,c\r\n\r\n  \n# x: y, \"z\n1,\"q \"\"w\"\"\",  3 \r\n\"multi\nline\",2,3\n4,5\n",
        )
        .unwrap();
        assert_eq!(f.header.fields, ["id", "\"a", "b\"", "c"]);
        assert_eq!(f.header.line, 2);
        assert_eq!(
            f.comments,
            [
                Comment {
                    line: 1,
                    text: "run: 1".into()
                },
                Comment {
                    line: 5,
                    text: "x: y, \"z".into()
                }
            ]
        );
        let lines: Vec<usize> = f.rows.iter().map(|r| r.line).collect();
        assert_eq!(lines, [6, 7, 9]);
        assert_eq!(f.rows[0].fields, ["1", "q \"w\"", "3"]);
        assert_eq!(f.rows[1].fields, ["multi\nline", "2", "3"]);
        assert_eq!(f.rows[2].get(1), "5");
        assert_eq!(f.rows[2].get(7), "");
        assert_eq!(f.column("c"), Some(3));
        assert_eq!(f.column_ignore_case("ID"), Some(0));
    }

    #[test]
    fn quoted_fields_keep_commas_and_hashes() {
        let f = parse("a,b\n\"#1\",\"x,y\"\n").unwrap();
        assert_eq!(f.rows[0].fields, ["#1", "x,y"]);
    }

    #[test]
    fn errors_name_file_line_and_column() {
        assert_eq!(err(""), "t.csv: empty file: no header row");
        assert_eq!(err("# only\n\n"), "t.csv: empty file: no header row");
        let e = err("a,b\n1,\"open\n2,3\n");
        assert_eq!(
            e,
            "t.csv: line 2, column \"b\": unterminated quote: the field runs to the end of the file"
        );
        assert!(err("\"a").contains("line 1: field 1: unterminated quote"));
        let f = parse("id,x,x\n# c\nr1,1,nan\nr2,y,2\nr3,1\n").unwrap();
        assert_eq!(
            f.check_unique_header(1).unwrap_err().to_string(),
            "t.csv: line 1, column \"x\": duplicate column name (columns 2 and 3)"
        );
        assert_eq!(f.number(&f.rows[0], 1).unwrap(), 1.0);
        assert_eq!(
            f.number(&f.rows[0], 2).unwrap_err().to_string(),
            "t.csv: line 3, column \"x\": \"nan\" is not finite (non-finite values, NaN and infinities, are not accepted)"
        );
        assert_eq!(
            f.number(&f.rows[1], 1).unwrap_err().to_string(),
            "t.csv: line 4, column \"x\": \"y\" is not a number"
        );
        assert_eq!(
            f.check_width(&f.rows[2]).unwrap_err().to_string(),
            "t.csv: line 5: 2 fields, but the header has 3"
        );
        assert_eq!(
            f.cell_error(5, 9, "m").to_string(),
            "t.csv: line 5, column 10: m"
        );
    }

    #[test]
    fn non_utf8_names_the_line() {
        let dir = std::env::temp_dir().join(format!("cellmorph-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.csv");
        std::fs::write(&path, b"a,b\n1,2\n3,\xff\n").unwrap();
        let e = CsvFile::read(&path).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            e.contains("bad.csv") && e.contains("line 3: not UTF-8"),
            "{e}"
        );
    }

    #[test]
    fn writer_quotes_only_what_needs_it_and_round_trips() {
        let mut w = CsvWriter::new();
        w.comment("k: v\nw");
        w.record(["sample", "a,b", "q\"", "#c", "d#"]);
        w.record(["S 1", "1.5", "-2", "", "x\ny"]);
        let text = w.into_string();
        assert_eq!(
            text,
            "# k: v w\nsample,\"a,b\",\"q\"\"\",\"#c\",\"d#\"\nS 1,1.5,-2,,\"x\ny\"\n"
        );
        let f = parse(&text).unwrap();
        assert_eq!(f.comments[0].text, "k: v w");
        assert_eq!(f.header.fields, ["sample", "a,b", "q\"", "#c", "d#"]);
        assert_eq!(f.rows[0].fields, ["S 1", "1.5", "-2", "", "x\ny"]);
    }
}
