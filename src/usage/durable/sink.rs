//! An append-only file that never keeps half a write: the journal's segments and the
//! ledger's are written through it.
//!
//! A full disk refuses a write part-way: some bytes of the batch are in the file, the
//! rest are not. Left there, the next batch would be appended onto half a record (a
//! torn journal frame, half a ledger line glued to the next event). So a write or a
//! sync that fails cuts the file back to where the batch began before the error is
//! returned, and if even that fails, the next append cuts it first: a file written
//! through an [`Appender`] ends on a whole batch.

use std::fmt::Debug;
use std::fs::File;
use std::io::{self, Write};

/// What an [`Appender`] needs of a file (a trait so that tests can stand a file in
/// that fails after so many bytes, as a full disk does).
pub trait AppendFile: Write + Send + Debug {
    fn sync_data(&self) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
}

impl AppendFile for File {
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}

/// A file opened for appending, with the length of what it holds whole.
#[derive(Debug)]
pub struct Appender {
    file: Box<dyn AppendFile>,
    /// Bytes of whole batches: where a failed write is cut back to.
    len: u64,
    /// A failed write may have left bytes past `len` (the cut failed too).
    torn: bool,
}

impl Appender {
    /// `file` (opened for appending) holds `len` bytes.
    pub fn new(file: impl AppendFile + 'static, len: u64) -> Appender {
        Appender {
            file: Box::new(file),
            len,
            torn: false,
        }
    }

    /// Bytes in the file, all whole batches.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `bytes` (and syncs them if `sync`) whole, or not at all: on failure the
    /// file is cut back to where it was, and the error returned.
    pub fn append(&mut self, bytes: &[u8], sync: bool) -> io::Result<()> {
        self.repair()?;
        let written = self.file.write_all(bytes).and_then(|()| match sync {
            true => self.file.sync_data(),
            false => Ok(()),
        });
        match written {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.torn = true;
                if let Err(cut) = self.repair() {
                    tracing::error!(error = %cut, "cutting a failed write back failed; retried before the next write");
                }
                Err(e)
            }
        }
    }

    /// Cuts what a failed write left past the last whole batch, durably.
    fn repair(&mut self) -> io::Result<()> {
        if self.torn {
            self.file.set_len(self.len)?;
            self.file.sync_data()?;
            self.torn = false;
        }
        Ok(())
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A file that takes `budget` more bytes and then refuses, having written part of the
/// write that crossed it: a disk filling up. The budget is shared, so a test can free
/// space.
#[cfg(test)]
#[derive(Debug)]
pub struct Filling {
    pub file: File,
    pub budget: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[cfg(test)]
impl Write for Filling {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::sync::atomic::Ordering;
        let left = self.budget.load(Ordering::SeqCst);
        if left == 0 && !buf.is_empty() {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        let n = self.file.write(&buf[..buf.len().min(left)])?;
        self.budget.fetch_sub(n, Ordering::SeqCst);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
impl AppendFile for Filling {
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A write the disk refuses part-way is cut back: the file holds whole batches
    /// only, and the next batch starts where the last whole one ended.
    #[test]
    fn a_partial_write_is_cut_back_to_the_last_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let budget = Arc::new(AtomicUsize::new(15));
        let mut a = Appender::new(
            Filling {
                file,
                budget: budget.clone(),
            },
            0,
        );
        a.append(b"one line\n", true).unwrap();
        let err = a.append(b"second line\n", true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(28), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"one line\n");
        assert_eq!(a.len(), 9);
        budget.store(1 << 20, Ordering::SeqCst);
        a.append(b"third line\n", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one line\nthird line\n");
        assert_eq!(a.len(), 20);
    }
}
