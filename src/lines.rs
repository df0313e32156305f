//! Newline framing with a size limit, checked before the line is buffered, so a
//! client can never make the server hold more than `max` bytes of one line
//! (and the `\r` of its CRLF).

use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;

use bytes::BufMut;
use tokio::io::AsyncRead;

/// Bytes asked of the transport per read, at most.
const READ_CHUNK: usize = 4 * 1024;

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
///
/// An idle reader holds no buffer: the read buffer is given back whenever the
/// transport has nothing to read and no partial line is pending, so ten
/// thousand quiet connections cost no read memory.
///
/// Each byte is looked at once: a partial line remembers how far it was
/// searched for its newline, so a line dribbled in a byte per read costs its
/// length, not its length squared (a 64 KiB line sent byte by byte once cost
/// 0.2 s of CPU). Reads go into the buffer's spare room without zeroing it
/// first, for the same reason.
pub struct LineReader<R> {
    inner: R,
    /// Bytes read; `buf[pos..]` is not yet returned as a line.
    buf: Vec<u8>,
    pos: usize,
    /// `buf[pos..pos + scanned]` holds no newline.
    scanned: usize,
    eof: bool,
    max: usize,
    /// Bytes searched for a newline so far (tests count the work).
    #[cfg(test)]
    searched: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// Wraps a transport.
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            buf: Vec::new(),
            pos: 0,
            scanned: 0,
            eof: false,
            max,
            #[cfg(test)]
            searched: 0,
        }
    }

    /// Whether a whole line is buffered: [`LineReader::next_line`] returns
    /// it without reading.
    pub fn has_line(&self) -> bool {
        let pending = &self.buf[self.pos..];
        pending[self.scanned..].contains(&b'\n')
    }

    /// The transport.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The next line without its terminator; `None` at end of stream (a last
    /// line without a newline is still returned first).
    pub async fn next_line(&mut self) -> Result<Option<&[u8]>, LineError> {
        loop {
            let pending = &self.buf[self.pos..];
            let unsearched = &pending[self.scanned..];
            #[cfg(test)]
            {
                self.searched += unsearched.len();
            }
            let newline = unsearched
                .iter()
                .position(|&b| b == b'\n')
                .map(|at| self.scanned + at);
            self.scanned = pending.len();
            let (len, consumed) = match newline {
                Some(at) => (at, at + 1),
                None if self.eof && !pending.is_empty() => (pending.len(), pending.len()),
                None if self.eof => return Ok(None),
                None => (pending.len(), 0),
            };
            // The limit is on the line without its terminator: a `\r` that
            // may be (or is) the start of a CRLF does not count.
            let terminator = usize::from(pending[..len].ends_with(b"\r"));
            if len - terminator > self.max {
                return Err(LineError::TooLong(self.max));
            }
            if consumed > 0 {
                let start = self.pos;
                self.pos += consumed;
                self.scanned = 0;
                let mut line = &self.buf[start..start + len];
                if let Some(stripped) = line.strip_suffix(b"\r") {
                    line = stripped;
                }
                return Ok(Some(line));
            }
            self.fill().await?;
        }
    }

    /// Watches the transport while a request is being answered, and returns
    /// only if it fails (a reset): the client can no longer be answered.
    /// It reads only while nothing is pending (what it reads is kept for
    /// [`Self::next_line`]); with bytes pending, the next request is there
    /// to be read anyway, and a client streaming requests is neither read
    /// ahead of nor has its pending bytes moved once per request. The end
    /// of the stream is noted, not returned: a client may close its sending
    /// side after its last request and still read the answer. Cancel-safe,
    /// like `next_line`.
    pub async fn hang_up(&mut self) -> std::io::Error {
        loop {
            if self.eof || self.pos < self.buf.len() {
                return std::future::pending().await;
            }
            if let Err(error) = self.fill().await {
                return error;
            }
        }
    }

    /// Reads more bytes after the pending partial line, or notes the end.
    async fn fill(&mut self) -> std::io::Result<()> {
        // Keep only the partial line, at the front.
        self.buf.drain(..self.pos);
        self.pos = 0;
        poll_fn(|cx| {
            self.buf.reserve(READ_CHUNK);
            // At most a chunk per read, into the spare room as it is (no
            // zeroing): the buffer grows only by what was read.
            let mut room = (&mut self.buf).limit(READ_CHUNK);
            let polled = tokio_util::io::poll_read_buf(Pin::new(&mut self.inner), cx, &mut room);
            match polled {
                Poll::Ready(Ok(got)) => {
                    self.eof = got == 0;
                    Poll::Ready(Ok(()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => {
                    if self.buf.is_empty() {
                        // Idle: give the buffer back until bytes arrive.
                        self.buf = Vec::new();
                    }
                    Poll::Pending
                }
            }
        })
        .await
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
        // A CRLF line may be as long as an LF one; a `\r` inside is content.
        let crlf: &[u8] = b"0123456789\r\n0123456789\r\r\n";
        let mut reader = LineReader::new(crlf, 10);
        assert_eq!(reader.next_line().await.unwrap(), Some(&b"0123456789"[..]));
        assert!(matches!(
            reader.next_line().await,
            Err(LineError::TooLong(10))
        ));
    }

    #[tokio::test]
    async fn lines_split_across_reads_and_an_idle_reader_holds_no_buffer() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut reader = LineReader::new(server, 100);
        use tokio::io::AsyncWriteExt;
        client.write_all(b"hel").await.unwrap();
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), reader.next_line());
        assert!(pending.await.is_err(), "no line yet");
        assert_eq!(
            reader.buf, b"hel",
            "the partial line is kept across a cancelled read"
        );
        client.write_all(b"lo\r\nwor").await.unwrap();
        assert_eq!(reader.next_line().await.unwrap(), Some(&b"hello"[..]));
        client.write_all(b"ld\n").await.unwrap();
        assert_eq!(reader.next_line().await.unwrap(), Some(&b"world"[..]));
        let idle = tokio::time::timeout(std::time::Duration::from_millis(50), reader.next_line());
        assert!(idle.await.is_err());
        assert_eq!(
            reader.buf.capacity(),
            0,
            "idle readers give their buffer back"
        );
        drop(client);
        assert!(reader.next_line().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn watching_for_a_hang_up_keeps_what_it_reads_and_reads_no_further() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(64);
        let mut reader = LineReader::new(server, 100);
        client.write_all(b"one\n").await.unwrap();
        assert_eq!(reader.next_line().await.unwrap(), Some(&b"one"[..]));
        client.write_all(b"two\nthr").await.unwrap();
        let watch = tokio::time::timeout(std::time::Duration::from_millis(50), reader.hang_up());
        assert!(watch.await.is_err(), "data is no hang-up");
        client.write_all(b"ee\n").await.unwrap();
        let watch = tokio::time::timeout(std::time::Duration::from_millis(50), reader.hang_up());
        assert!(watch.await.is_err(), "nor is more data");
        assert_eq!(reader.buf, b"two\nthr", "read once, nothing pending then");
        assert_eq!(reader.next_line().await.unwrap(), Some(&b"two"[..]));
        assert_eq!(reader.next_line().await.unwrap(), Some(&b"three"[..]));
        drop(client);
        let watch = tokio::time::timeout(std::time::Duration::from_millis(50), reader.hang_up());
        assert!(watch.await.is_err(), "the end of the stream is no hang-up");
        assert!(reader.next_line().await.unwrap().is_none());
    }

    /// A transport that hands over one byte per read, as a client dribbling
    /// a line would.
    struct Dribble<'a>(&'a [u8]);

    impl AsyncRead for Dribble<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some((&first, rest)) = self.0.split_first() {
                buf.put_slice(&[first]);
                self.0 = rest;
            }
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_line_dribbled_byte_by_byte_is_searched_once() {
        let max = 64 * 1024;
        let mut input = vec![b'x'; max];
        input.push(b'\n');
        input.extend_from_slice(b"next\n");
        let mut reader = LineReader::new(Dribble(&input), max);
        let line = reader.next_line().await.unwrap().map(<[u8]>::len);
        assert_eq!(line, Some(max));
        assert_eq!(reader.next_line().await.unwrap(), Some(&b"next"[..]));
        // Each byte once (the old reader searched the whole partial line on
        // every read: about max * max / 2 = 2 * 10^9 bytes here).
        assert_eq!(reader.searched, input.len(), "bytes searched");
        assert!(reader.buf.capacity() < 2 * (max + READ_CHUNK));
    }
}
