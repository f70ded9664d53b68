//! The API server's response buffering: a 2048-byte buffered writer in front of the
//! chunked encoder (Go's `bufio.Writer`), which decides where HTTP chunks begin and end.

/// The response buffer of kube-apiserver's HTTP/1.1 server.
pub const BUFFER: usize = 2048;

/// Turns a sequence of writes into the chunks a Go HTTP server would send.
#[derive(Debug, Default)]
pub struct Chunker {
    buf: Vec<u8>,
    out: Vec<Vec<u8>>,
}

impl Chunker {
    /// One write: fills the buffer and flushes it when full; a write larger than the free
    /// space that finds the buffer empty goes out as a chunk of its own.
    pub fn write(&mut self, mut p: &[u8]) {
        while p.len() > BUFFER - self.buf.len() {
            if self.buf.is_empty() {
                self.out.push(p.to_vec());
                return;
            }
            let n = BUFFER - self.buf.len();
            self.buf.extend_from_slice(&p[..n]);
            self.flush();
            p = &p[n..];
        }
        self.buf.extend_from_slice(p);
    }

    /// Sends what is buffered as one chunk.
    pub fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.out.push(std::mem::take(&mut self.buf));
        }
    }

    /// The chunks so far (call `flush` first to include the buffer).
    pub fn take(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.out)
    }

    /// Whether nothing has been sent yet: a response that ends now fits in one buffer and
    /// gets a Content-Length instead of chunks.
    pub fn nothing_sent(&self) -> bool {
        self.out.is_empty()
    }
}

/// The chunks of a burst of watch lines written back to back and flushed when no more are
/// queued.
pub fn burst(lines: &[String]) -> Vec<Vec<u8>> {
    let mut c = Chunker::default();
    for l in lines {
        c.write(l.as_bytes());
    }
    c.flush();
    c.take()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_writes_fill_the_buffer_large_ones_go_alone() {
        let lines: Vec<String> = [2031usize, 1801, 1567, 224]
            .iter()
            .map(|n| "x".repeat(*n))
            .collect();
        let sizes: Vec<usize> = burst(&lines).iter().map(Vec::len).collect();
        // cnpg-failover/05: the initial events of a streaming list.
        assert_eq!(sizes, [2048, 2048, 1527]);
        let sizes: Vec<usize> = burst(&["y".repeat(5000)]).iter().map(Vec::len).collect();
        assert_eq!(sizes, [5000]);
    }
}
