//! Where data records come from, read as a stream: a JSON Lines file, a JSON array, either
//! gzip-compressed (`.gz`), a Parquet file, a folder of such files (shards in name order), or a
//! Hugging Face Hub dataset id (`hf:OWNER/NAME[/CONFIG][@REVISION][:SPLIT]`, see
//! [`crate::io::hub::DatasetId`]). JSON Lines and Parquet are read a line / a record batch at a
//! time, so only the records not yet tokenised are held; a JSON array is read whole.
//!
//! Parquet rows become the JSON objects the JSONL readers take (through `arrow-json`): nested
//! columns (lists of messages, TL;DR's `info` struct) become nested JSON, nulls stay `null`, so a
//! dataset gives the same records in either format.

use crate::data::Record;
use crate::io::hub::{self, DatasetId};
use crate::{Error, Result};
use serde_json::Value;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Rows per Parquet record batch.
const BATCH_ROWS: usize = 1024;

/// Sources at least this large show a progress bar while they are tokenised.
const LARGE_ROWS: usize = 5000;
const LARGE_BYTES: u64 = 4 << 20;

/// The local files of a data source, in reading order. `default_split` is the role's split
/// (`train` for training data, `test` for held-out data) for Hub ids and folders whose files
/// carry split names.
pub fn files_of(source: &Path, default_split: &str) -> Result<Vec<PathBuf>> {
    let shown = source.to_string_lossy();
    if let Some(id) = DatasetId::parse(&shown) {
        return hub::dataset_files(&id?, default_split);
    }
    if source.is_file() {
        return Ok(vec![source.to_path_buf()]);
    }
    if source.is_dir() {
        let all = hub::data_files_under(source)?;
        if all.is_empty() {
            return Err(Error::parse(source, "the folder holds no .parquet, .jsonl or .json(.gz) files"));
        }
        let (_, files) = hub::split_files(&all, default_split, false, false).map_err(|splits| {
            Error::parse(
                source,
                format!(
                    "the folder's files are split into {} and none is '{default_split}'; name one file",
                    splits.join(", ")
                ),
            )
        })?;
        return Ok(files.iter().map(|f| source.join(f)).collect());
    }
    let hint = if hub::looks_like_repo_id(&shown) {
        format!("; for a Hub dataset write {}{shown}", hub::DATASET_PREFIX)
    } else {
        String::new()
    };
    Err(Error::parse(source, format!("no such file or folder{hint}")))
}

/// Checks that a data source can be read: the file or folder is there, or the Hub id resolves
/// (from the cache, or downloaded). Used before a run writes anything.
pub fn check(field: &str, source: &Path, default_split: &str) -> Result<()> {
    files_of(source, default_split).map(|_| ()).map_err(|e| Error::Invalid(format!("{field}: {e}")))
}

/// The records of a data source, in order, as a stream (see the module doc). Items are records
/// (with per-record problems, see [`Record`]) or errors that stop reading (a file that cannot
/// be read or a corrupt Parquet page), naming the file.
pub struct Records {
    /// The source as the user named it (a path or an `hf:` id).
    pub source: PathBuf,
    /// Rows in all, when the files say (Parquet footers).
    pub total: Option<usize>,
    /// Whether reading is long enough to show progress.
    pub large: bool,
    files: std::vec::IntoIter<PathBuf>,
    /// Location prefix per file when there are several (`train-00001-of-00002.parquet `).
    several: bool,
    current: Option<FileRecords>,
    pending: VecDeque<Result<Record>>,
    /// Records still to give (`max_records`).
    left: Option<usize>,
    /// Column types of the Parquet file being read, for error messages.
    schema: Option<String>,
}

impl Records {
    /// Opens `source` (see [`files_of`]).
    pub fn open(source: &Path, default_split: &str) -> Result<Records> {
        let files = files_of(source, default_split)?;
        let mut total = Some(0usize);
        let mut bytes = 0u64;
        for f in &files {
            bytes += std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
            total = match (total, is_parquet(f)) {
                (Some(t), true) => parquet_rows(f).ok().map(|n| t + n),
                _ => None,
            };
        }
        let large = total.map_or(bytes >= LARGE_BYTES, |t| t >= LARGE_ROWS);
        Ok(Records {
            source: source.to_path_buf(),
            total,
            large,
            several: files.len() > 1,
            files: files.into_iter(),
            current: None,
            pending: VecDeque::new(),
            left: None,
            schema: None,
        })
    }

    /// Gives at most `n` records (as `datasets`' `select(range(n))`: skipped records count).
    pub fn limit(mut self, n: Option<usize>) -> Self {
        self.left = n;
        self
    }

    /// The first record that is JSON (what formats are detected from), without consuming it.
    pub fn first_value(&mut self) -> Result<Option<Value>> {
        for r in &self.pending {
            match r {
                Ok(Record { value: Ok(v), .. }) => return Ok(Some(v.clone())),
                Err(_) => return Ok(None),
                _ => {}
            }
        }
        while let Some(r) = self.pull() {
            let found = match &r {
                Ok(Record { value: Ok(v), .. }) => Some(Some(v.clone())),
                Err(_) => Some(None),
                _ => None,
            };
            self.pending.push_back(r);
            if let Some(v) = found {
                return Ok(v);
            }
        }
        Ok(None)
    }

    /// ` (columns: name: type, ...)` while a Parquet file is read: what a record error about a
    /// field's type is about.
    pub fn schema_hint(&self) -> String {
        self.schema.as_ref().map(|s| format!(" (Parquet columns: {s})")).unwrap_or_default()
    }

    fn pull(&mut self) -> Option<Result<Record>> {
        loop {
            if let Some(cur) = &mut self.current {
                match cur.next() {
                    Some(r) => return Some(r),
                    None => self.current = None,
                }
            }
            let path = self.files.next()?;
            let prefix = if self.several { format!("{} ", display_name(&path)) } else { String::new() };
            match FileRecords::open(&path, prefix) {
                Ok((f, schema)) => {
                    self.schema = schema;
                    self.current = Some(f);
                }
                Err(e) => {
                    self.files = Vec::new().into_iter();
                    return Some(Err(e));
                }
            }
        }
    }
}

impl Iterator for Records {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        if self.left == Some(0) {
            return None;
        }
        let r = match self.pending.pop_front() {
            Some(r) => r,
            None => self.pull()?,
        };
        if let Some(n) = &mut self.left {
            *n -= 1;
        }
        Some(r)
    }
}

fn is_parquet(p: &Path) -> bool {
    p.to_string_lossy().to_ascii_lowercase().ends_with(".parquet")
}

/// A file's name as locations show it: below the HF cache's `snapshots/{commit}/`, else its
/// file name.
fn display_name(p: &Path) -> String {
    let parts: Vec<String> = p.components().map(|c| c.as_os_str().to_string_lossy().to_string()).collect();
    match parts.iter().position(|c| c == "snapshots") {
        Some(i) if i + 2 < parts.len() => parts[i + 2..].join("/"),
        _ => p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().to_string()),
    }
}

fn parquet_rows(p: &Path) -> Result<usize> {
    let file = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
    let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::parse(p, format!("not a readable Parquet file: {e}")))?;
    Ok(b.metadata().file_metadata().num_rows().max(0) as usize)
}

/// The records of one file.
enum FileRecords {
    Lines {
        path: PathBuf,
        prefix: String,
        reader: Box<dyn BufRead>,
        line: usize,
    },
    Array {
        prefix: String,
        values: std::iter::Enumerate<std::vec::IntoIter<Value>>,
    },
    Parquet {
        path: PathBuf,
        prefix: String,
        reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
        rows: VecDeque<Value>,
        row: usize,
    },
}

impl FileRecords {
    /// Opens a file; for Parquet also its column types.
    fn open(path: &Path, prefix: String) -> Result<(FileRecords, Option<String>)> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        if is_parquet(path) {
            let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(|e| Error::parse(path, format!("not a readable Parquet file: {e}")))?;
            let schema = b
                .schema()
                .fields()
                .iter()
                .map(|f| format!("{}: {}", f.name(), f.data_type()))
                .collect::<Vec<_>>()
                .join(", ");
            let reader = b
                .with_batch_size(BATCH_ROWS)
                .build()
                .map_err(|e| Error::parse(path, format!("not a readable Parquet file: {e}")))?;
            let f = FileRecords::Parquet { path: path.to_path_buf(), prefix, reader, rows: VecDeque::new(), row: 0 };
            return Ok((f, Some(schema)));
        }
        let raw: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::read::MultiGzDecoder::new(file))
        } else {
            Box::new(file)
        };
        let mut reader: Box<dyn BufRead> = Box::new(BufReader::with_capacity(1 << 16, raw));
        // A JSON array (`[` first) is read whole; JSON Lines a line at a time.
        let first = loop {
            let buf = reader.fill_buf().map_err(|e| Error::io(path, e))?;
            match buf.iter().position(|b| !b.is_ascii_whitespace()) {
                Some(i) => break Some(buf[i]),
                None if buf.is_empty() => break None,
                None => {
                    let n = buf.len();
                    reader.consume(n);
                }
            }
        };
        if first == Some(b'[') {
            let mut bytes = Vec::new();
            reader.read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
            let text = std::str::from_utf8(&bytes).map_err(|e| {
                let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
                Error::parse(path, format!("line {line}: not valid UTF-8"))
            })?;
            let v: Vec<Value> =
                serde_json::from_str(text).map_err(|e| Error::parse(path, format!("invalid JSON: {e}")))?;
            return Ok((FileRecords::Array { prefix, values: v.into_iter().enumerate() }, None));
        }
        Ok((FileRecords::Lines { path: path.to_path_buf(), prefix, reader, line: 0 }, None))
    }

    fn next(&mut self) -> Option<Result<Record>> {
        match self {
            FileRecords::Array { prefix, values } => {
                values.next().map(|(i, v)| Ok(Record { loc: format!("{prefix}record {}", i + 1), value: Ok(v) }))
            }
            FileRecords::Lines { path, prefix, reader, line } => loop {
                let mut buf = Vec::new();
                match reader.read_until(b'\n', &mut buf) {
                    Err(e) => return Some(Err(Error::io(path.as_path(), e))),
                    Ok(0) => return None,
                    Ok(_) => {}
                }
                *line += 1;
                let loc = format!("{prefix}line {line}");
                let value = match std::str::from_utf8(&buf) {
                    Err(e) => Err(format!("not valid UTF-8 (byte {})", e.valid_up_to())),
                    Ok(l) if l.trim().is_empty() => continue,
                    Ok(l) => serde_json::from_str(l).map_err(|e| format!("invalid JSON: {e}")),
                };
                return Some(Ok(Record { loc, value }));
            },
            FileRecords::Parquet { path, prefix, reader, rows, row } => {
                while rows.is_empty() {
                    let batch = match reader.next()? {
                        Ok(b) => b,
                        Err(e) => {
                            return Some(Err(Error::parse(
                                path.as_path(),
                                format!("corrupt Parquet data after row {row}: {e}"),
                            )))
                        }
                    };
                    match batch_rows(&batch) {
                        Ok(v) => rows.extend(v),
                        Err(e) => return Some(Err(Error::parse(path.as_path(), format!("rows after {row}: {e}")))),
                    }
                }
                *row += 1;
                let v = rows.pop_front()?;
                Some(Ok(Record { loc: format!("{prefix}row {row}"), value: Ok(v) }))
            }
        }
    }
}

/// A record batch's rows as JSON objects (nulls kept as `null`).
fn batch_rows(batch: &arrow_array::RecordBatch) -> std::result::Result<Vec<Value>, String> {
    let mut w = arrow_json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, arrow_json::writer::LineDelimited>(Vec::new());
    w.write(batch).map_err(|e| format!("cannot turn the columns into JSON: {e}"))?;
    w.finish().map_err(|e| format!("cannot turn the columns into JSON: {e}"))?;
    let bytes = w.into_inner();
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).map_err(|e| format!("cannot turn the columns into JSON: {e}")))
        .collect()
}
