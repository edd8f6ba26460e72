//! A byte stream cut into blocks of whole lines, so a log can be searched a block at a
//! time rather than a line at a time.
//!
//! A block ends at a newline, so no line (and no id inside one) is ever cut in two: the
//! piece after a block's last newline waits at the front of the buffer for the rest of
//! its line. A line longer than the buffer grows it, as reading that line alone would,
//! and the buffer shrinks back once the line has gone. The end of the stream ends the
//! last line, newline or not.

use std::io::{self, ErrorKind, Read};

/// Bytes read at a time. A block this size stays in a core's L2 cache between the copy
/// out of the page cache and the searches over it: on warm logs of 300-800 MB, 4 MiB
/// blocks measured 15-20 % slower, and 256 KiB ones no faster on short lines and 8 %
/// slower on lines of 8-256 KiB (more of each block is a line carried over).
pub(crate) const BLOCK: usize = 1 << 20;

/// Reads a stream and hands it out in blocks of whole lines.
#[derive(Debug)]
pub(crate) struct Blocks<R> {
    reader: R,
    /// The buffer; `buf.len()` is its capacity, `buf[..len]` holds data.
    buf: Vec<u8>,
    /// Bytes of `buf` holding data.
    len: usize,
    /// Bytes at the front of `buf` already handed out.
    done: usize,
    /// The size `buf` returns to after a long line.
    block: usize,
    /// The reader said end of stream.
    eof: bool,
}

impl<R: Read> Blocks<R> {
    /// Blocks of about [`BLOCK`] bytes.
    pub(crate) fn new(reader: R) -> Self {
        Blocks::with_block_size(reader, BLOCK)
    }

    /// Blocks of about `block` bytes (at least one).
    pub(crate) fn with_block_size(reader: R, block: usize) -> Self {
        let block = block.max(1);
        Blocks {
            reader,
            buf: vec![0; block],
            len: 0,
            done: 0,
            block,
            eof: false,
        }
    }

    /// The next block: whole lines, each ending with a newline except perhaps the last
    /// one of the stream. `None` at the end of the stream.
    pub(crate) fn next_block(&mut self) -> io::Result<Option<&[u8]>> {
        // The start of a line the last block could not finish moves to the front.
        self.buf.copy_within(self.done..self.len, 0);
        self.len -= self.done;
        self.done = 0;
        if self.buf.len() > self.block && self.len <= self.block {
            self.buf.truncate(self.block);
            self.buf.shrink_to_fit();
        }
        // What is carried over holds no newline: only new bytes need a look.
        let mut searched = self.len;
        loop {
            if self.eof {
                self.done = self.len;
                return Ok((self.len > 0).then(|| &self.buf[..self.len]));
            }
            if self.len == self.buf.len() {
                // One line fills the buffer: make room for the rest of it.
                self.buf.resize(self.buf.len() * 2, 0);
            }
            self.fill()?;
            if let Some(i) = memchr::memrchr(b'\n', &self.buf[searched..self.len]) {
                self.done = searched + i + 1;
                return Ok(Some(&self.buf[..self.done]));
            }
            searched = self.len;
        }
    }

    /// Reads until the buffer is full or the stream ends: a pipe or a decoder hands out
    /// less than asked, and a block per short read would be searched in pieces.
    fn fill(&mut self) -> io::Result<()> {
        while self.len < self.buf.len() {
            match self.reader.read(&mut self.buf[self.len..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.len += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out at most `step` bytes a call, as a pipe does.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn blocks(data: &[u8], block: usize, step: usize) -> Vec<Vec<u8>> {
        let mut blocks = Blocks::with_block_size(Trickle { data, step }, block);
        let mut out = Vec::new();
        while let Some(b) = blocks.next_block().unwrap() {
            out.push(b.to_vec());
        }
        out
    }

    #[test]
    fn blocks_end_at_a_newline_and_join_back_to_the_stream() {
        let data = b"first line\nsecond, longer line\nthird\nno newline at the end";
        for block in 1..data.len() + 2 {
            for step in [1, 3, 7, 64] {
                let out = blocks(data, block, step);
                assert_eq!(out.concat(), data, "block {block}, step {step}");
                let (last, whole) = out.split_last().unwrap();
                assert!(whole.iter().all(|b| b.ends_with(b"\n")));
                assert!(last.ends_with(b"at the end"));
            }
        }
    }

    #[test]
    fn a_line_longer_than_the_block_comes_whole_and_the_buffer_shrinks_back() {
        let long = vec![b'x'; 10_000];
        let data = [b"a\n".as_slice(), &long, b"\nb\n"].concat();
        let mut blocks = Blocks::with_block_size(
            Trickle {
                data: &data,
                step: 100,
            },
            64,
        );
        let mut out = Vec::new();
        while let Some(b) = blocks.next_block().unwrap() {
            out.push(b.to_vec());
        }
        assert!(
            out.iter().any(|b| b.len() >= long.len()),
            "the long line in one block"
        );
        assert_eq!(out.concat(), data);
        assert_eq!(blocks.buf.len(), 64);
    }

    #[test]
    fn empty_input_has_no_block() {
        assert!(blocks(b"", 16, 4).is_empty());
    }
}
