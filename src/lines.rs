//! Newline framing with a size limit, checked before the line is buffered, so a
//! client can never make the server hold more than `max` bytes of one line.

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Why no line came.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The line grew past the limit before its newline.
    #[error("line longer than {0} bytes")]
    TooLong(usize),
    /// The transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads `\n`-terminated lines (a trailing `\r` is dropped) of at most `max` bytes.
///
/// Cancel-safe: bytes taken from the transport are kept in `self` until their
/// line is complete, so dropping a pending `next_line` loses nothing.
pub struct LineReader<R> {
    inner: BufReader<R>,
    line: Vec<u8>,
    complete: bool,
    max: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// Wraps a transport.
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner: BufReader::with_capacity(8 * 1024, inner),
            line: Vec::new(),
            complete: false,
            max,
        }
    }

    /// The next line without its terminator, or `None` at end of stream. A final
    /// line without a newline still counts as a line.
    pub async fn next_line(&mut self) -> Result<Option<&[u8]>, LineError> {
        if self.complete {
            self.line.clear();
            self.complete = false;
            // Give back memory a past long line took.
            if self.line.capacity() > 16 * 1024 {
                self.line.shrink_to(1024);
            }
        }
        loop {
            let available = self.inner.fill_buf().await?;
            if available.is_empty() {
                if self.line.is_empty() {
                    return Ok(None);
                }
                break;
            }
            let (chunk, consumed, done) = match available.iter().position(|&b| b == b'\n') {
                Some(at) => (&available[..at], at + 1, true),
                None => (available, available.len(), false),
            };
            if self.line.len() + chunk.len() > self.max {
                return Err(LineError::TooLong(self.max));
            }
            self.line.extend_from_slice(chunk);
            self.inner.consume(consumed);
            if done {
                break;
            }
        }
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        self.complete = true;
        Ok(Some(&self.line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn splits_lines_and_enforces_the_limit() {
        let input: &[u8] = b"one\r\ntwo\n\nlast";
        let mut reader = LineReader::new(input, 10);
        assert_eq!(reader.next_line().await.unwrap(), Some(&b"one"[..]));
        assert_eq!(reader.next_line().await.unwrap(), Some(&b"two"[..]));
        assert_eq!(reader.next_line().await.unwrap(), Some(&b""[..]));
        assert_eq!(reader.next_line().await.unwrap(), Some(&b"last"[..]));
        assert!(reader.next_line().await.unwrap().is_none());

        let long: &[u8] = b"0123456789A\nok\n";
        let mut reader = LineReader::new(long, 10);
        assert!(matches!(
            reader.next_line().await,
            Err(LineError::TooLong(10))
        ));
        let exact: &[u8] = b"0123456789\n";
        let mut reader = LineReader::new(exact, 10);
        assert_eq!(reader.next_line().await.unwrap(), Some(&b"0123456789"[..]));
    }
}
