//! Reading one policy file: regular files only, opened without blocking, and never
//! more than the size limit.
//!
//! A policy directory is written by people and tools, so anything can sit in it under
//! a policy file's name: a FIFO (opening it for reading would wait for a writer, and
//! block reload for ever), a character device such as `/dev/zero` behind a symlink (its
//! size reads 0, and it never ends).

use std::path::Path;

use super::error::Diagnostic;
use super::source::{FoundFile, Limits, io_diag};

/// Reads a file's text. The file is opened without blocking, checked to be a regular
/// file on the open descriptor (it may have been swapped since it was listed), and read
/// through a cap one byte over the limit.
pub fn read_file(file: &FoundFile, limits: &Limits) -> Result<String, Diagnostic> {
    let bytes = read_bounded(&file.abs, limits.max_file_bytes).map_err(|e| match e {
        ReadError::Io(e) => io_diag(&file.rel, &e, "cannot read"),
        ReadError::NotRegular(kind) => Diagnostic {
            file: file.rel.clone(),
            line: 0,
            column: 0,
            message: format!(
                "not a regular file ({kind}): only regular files are read as policy files"
            ),
        },
        ReadError::TooLarge(len) => Diagnostic {
            file: file.rel.clone(),
            line: 1,
            column: 1,
            message: match len {
                Some(len) => format!(
                    "file is {len} bytes, over the limit of {} bytes",
                    limits.max_file_bytes
                ),
                None => format!(
                    "file grew past the limit of {} bytes while it was read",
                    limits.max_file_bytes
                ),
            },
        },
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let (line, column) = line_col(&e.as_bytes()[..e.utf8_error().valid_up_to()]);
        Diagnostic {
            file: file.rel.clone(),
            line,
            column,
            message: "expected UTF-8 text".into(),
        }
    })
}

enum ReadError {
    Io(std::io::Error),
    /// What the file is instead.
    NotRegular(&'static str),
    /// Its size (`None`: it grew past the limit while it was read).
    TooLarge(Option<u64>),
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(ReadError::Io)?;
    let meta = f.metadata().map_err(ReadError::Io)?;
    let t = meta.file_type();
    if !t.is_file() {
        return Err(ReadError::NotRegular(if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else {
            "not a file"
        }));
    }
    if meta.len() > max {
        return Err(ReadError::TooLarge(Some(meta.len())));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > max {
        return Err(ReadError::TooLarge(None));
    }
    Ok(bytes)
}

fn line_col(prefix: &[u8]) -> (u64, u64) {
    let line = prefix.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
    let col = prefix.iter().rev().take_while(|&&b| b != b'\n').count() as u64 + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::policy::source::Format;

    /// Reads `abs` on another thread: a read that blocks fails the test instead of
    /// hanging it.
    fn read_within(abs: PathBuf, limits: Limits) -> Result<String, Diagnostic> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let file = FoundFile {
                rel: PathBuf::from("special.yaml"),
                abs,
                format: Format::Yaml,
            };
            let _ = tx.send(read_file(&file, &limits));
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("reading a policy file blocked")
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("special.yaml");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let e = read_within(fifo, Limits::default()).unwrap_err();
        assert_eq!(e.file, PathBuf::from("special.yaml"));
        assert!(e.message.contains("not a regular file (a FIFO)"), "{e}");
    }

    #[test]
    fn a_device_behind_a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("special.yaml");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let e = read_within(link, Limits::default()).unwrap_err();
        assert!(e.message.contains("a character device"), "{e}");
    }

    #[test]
    fn a_regular_file_is_read_up_to_the_limit_and_no_further() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("special.yaml");
        std::fs::write(&p, "features: {}\n").unwrap();
        let exact = Limits {
            max_file_bytes: 13,
            ..Limits::default()
        };
        assert_eq!(read_within(p.clone(), exact).unwrap(), "features: {}\n");
        let under = Limits {
            max_file_bytes: 12,
            ..Limits::default()
        };
        let e = read_within(p, under).unwrap_err();
        assert!(e.message.contains("13 bytes, over the limit of 12"), "{e}");
    }
}
