//! A container's output on its way out: cut into bounded lines
//! ([`LineSplitter`]) and kept, in memory only, in a bounded ring ([`LogRing`]).
//! Output may echo secrets, so it never touches a disk.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;

/// Longest output line kept: a longer run of bytes without a newline is cut
/// into pieces of at most this size.
pub const MAX_LINE: usize = 4096;

/// Cuts a byte stream into lines of at most `max` bytes (without their `\n`).
#[derive(Debug)]
pub struct LineSplitter {
    partial: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    /// A splitter for lines of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { partial: Vec::new(), max: max.max(1) }
    }

    /// Feeds `bytes`; `line` gets each complete (or cut) line. A full piece is
    /// held until the next byte shows whether it ended at a newline.
    pub fn feed(&mut self, mut bytes: &[u8], mut line: impl FnMut(String)) {
        while !bytes.is_empty() {
            if self.partial.len() == self.max {
                if bytes[0] == b'\n' {
                    bytes = &bytes[1..];
                }
                line(self.take());
                continue;
            }
            let room = (self.max - self.partial.len()).min(bytes.len());
            match bytes[..room].iter().position(|b| *b == b'\n') {
                Some(i) => {
                    self.partial.extend_from_slice(&bytes[..i]);
                    bytes = &bytes[i + 1..];
                    line(self.take());
                }
                None => {
                    self.partial.extend_from_slice(&bytes[..room]);
                    bytes = &bytes[room..];
                }
            }
        }
    }

    /// The last, unterminated line, if any.
    pub fn finish(&mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let l = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        l
    }
}

/// A task's output, kept in memory only: the last `max_lines` lines, and no
/// more than [`LogRing::MAX_BYTES`] bytes of them.
#[derive(Clone, Debug)]
pub struct LogRing {
    inner: Arc<Mutex<Ring>>,
    max_lines: usize,
}

#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<String>,
    bytes: usize,
    total: u64,
}

impl LogRing {
    /// Bytes held at most.
    pub const MAX_BYTES: usize = 1 << 20;

    /// A ring of `max_lines` lines.
    pub fn new(max_lines: usize) -> Self {
        Self { inner: Arc::default(), max_lines: max_lines.max(1) }
    }

    fn push(&self, line: String) {
        let mut g = self.inner.lock().expect("log ring lock");
        while !g.lines.is_empty() && (g.lines.len() >= self.max_lines || g.bytes + line.len() > Self::MAX_BYTES) {
            if let Some(old) = g.lines.pop_front() {
                g.bytes -= old.len();
            }
        }
        g.bytes += line.len();
        g.lines.push_back(line);
        g.total += 1;
    }

    /// The lines held, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.inner.lock().expect("log ring lock").lines.iter().cloned().collect()
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.inner.lock().expect("log ring lock").bytes
    }

    /// The lines pushed after the first `seen` ever pushed (those still held),
    /// and the new count to pass next time.
    pub fn since(&self, seen: u64) -> (Vec<String>, u64) {
        let g = self.inner.lock().expect("log ring lock");
        let total = g.total;
        let new = (total - seen.min(total)).min(g.lines.len() as u64) as usize;
        (g.lines.iter().skip(g.lines.len() - new).cloned().collect(), total)
    }

    /// Reads `stream` to its end in bounded chunks, one line at a time into the ring.
    pub(super) async fn pump(self, mut stream: impl tokio::io::AsyncRead + Unpin) {
        let mut buf = vec![0u8; 16 * 1024];
        let mut split = LineSplitter::new(MAX_LINE);
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => split.feed(&buf[..n], |l| self.push(l)),
            }
        }
        if let Some(l) = split.finish() {
            self.push(l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]], max: usize) -> Vec<String> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |l| out.push(l));
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn output_lines_are_cut_at_the_maximum_length() {
        assert_eq!(split(&[b"a\nbc\n", b"d", b"e\nf"], 8), ["a", "bc", "de", "f"]);
        assert_eq!(split(&[b"abcdefghij\n"], 4), ["abcd", "efgh", "ij"]);
        assert_eq!(split(&[b"abcd\nef"], 4), ["abcd", "ef"]);
        assert_eq!(split(&[b"abcd", b"\nef"], 4), ["abcd", "ef"]);
        assert_eq!(split(&[b"\n\n"], 4), ["", ""]);
        // 1 MiB without a newline: pieces of 4 KiB.
        let big = vec![b'x'; 1 << 20];
        let lines = split(&[&big], MAX_LINE);
        assert_eq!(lines.len(), 256);
        assert!(lines.iter().all(|l| l.len() == MAX_LINE));
    }

    #[test]
    fn the_log_ring_is_bounded_in_lines_and_bytes() {
        let ring = LogRing::new(1000);
        for _ in 0..10_000 {
            ring.push("y".repeat(MAX_LINE));
        }
        assert!(ring.bytes() <= LogRing::MAX_BYTES, "{}", ring.bytes());
        assert_eq!(ring.lines().len(), LogRing::MAX_BYTES / MAX_LINE);
        let (recent, total) = ring.since(9_990);
        assert_eq!((recent.len(), total), (10, 10_000));
        let small = LogRing::new(3);
        for i in 0..5 {
            small.push(i.to_string());
        }
        assert_eq!(small.lines(), ["2", "3", "4"]);
    }
}
