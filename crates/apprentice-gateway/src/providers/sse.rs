//! Server-sent events: decoding a byte stream into events, and turning a streamed HTTP response
//! into a [`ChunkStream`] with a provider-specific event parser.

use std::collections::VecDeque;
use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::http::{protocol, transport};
use super::{ChunkStream, ProviderError, StreamChunk};

/// One dispatched event: its `event:` name (if any) and its `data:` lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

/// Incremental SSE decoder. Network reads split the stream anywhere, including inside a line or a
/// UTF-8 character, so bytes are buffered until a whole line is there.
#[derive(Debug, Default)]
pub(crate) struct SseDecoder {
    buffer: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
}

impl SseDecoder {
    /// Feeds bytes; returns the events completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(newline) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=newline).collect();
            let line = line.strip_suffix(b"\n").unwrap_or(&line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = std::str::from_utf8(line).map_err(|e| format!("event stream is not UTF-8: {e}"))?;
            if let Some(event) = self.line(line) {
                events.push(event);
            }
        }
        Ok(events)
    }

    /// At the end of the body: an event whose terminating blank line never came still counts.
    pub fn finish(&mut self) -> Result<Option<SseEvent>, String> {
        if !self.buffer.is_empty() {
            let rest = std::mem::take(&mut self.buffer);
            let line = std::str::from_utf8(&rest).map_err(|e| format!("event stream is not UTF-8: {e}"))?;
            if let Some(event) = self.line(line.trim_end_matches('\r')) {
                return Ok(Some(event));
            }
        }
        Ok(self.dispatch())
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None; // a comment, used by servers as keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "event" => self.event = Some(value.to_string()),
            _ => {} // `id`, `retry` and unknown fields do not matter to a one-shot stream
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        // Per the SSE spec an event without data is not dispatched.
        self.data.take().map(|data| SseEvent { event, data })
    }
}

/// What a provider's event parser makes of one event.
pub(crate) enum SseStep {
    /// Chunks to hand on (possibly none, e.g. for pings).
    Chunks(Vec<StreamChunk>),
    /// The upstream says the answer is complete; anything after is ignored.
    Done,
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

struct State<P> {
    provider: String,
    body: ByteStream,
    decoder: SseDecoder,
    parser: P,
    ready: VecDeque<Result<StreamChunk, ProviderError>>,
    finished: bool,
}

impl<P> State<P>
where
    P: FnMut(SseEvent) -> Result<SseStep, ProviderError>,
{
    /// Runs the parser over `events`, queueing its chunks; an error ends the stream after it.
    fn parse(&mut self, events: impl IntoIterator<Item = SseEvent>) {
        for event in events {
            match (self.parser)(event) {
                Ok(SseStep::Chunks(chunks)) => self.ready.extend(chunks.into_iter().map(Ok)),
                Ok(SseStep::Done) => {
                    self.finished = true;
                    return;
                }
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    fn fail(&mut self, error: ProviderError) {
        self.ready.push_back(Err(error));
        self.finished = true;
    }

    async fn read_more(&mut self) {
        match self.body.next().await {
            Some(Ok(bytes)) => match self.decoder.push(&bytes) {
                Ok(events) => self.parse(events),
                Err(message) => self.fail(protocol(&self.provider, message)),
            },
            Some(Err(e)) => {
                let error = transport(&self.provider, &e);
                self.fail(error);
            }
            None => {
                // A clean end of body without the upstream's end marker: some compatible servers
                // just close the connection, so what arrived is the answer.
                match self.decoder.finish() {
                    Ok(last) => self.parse(last),
                    Err(message) => self.ready.push_back(Err(protocol(&self.provider, message))),
                }
                self.finished = true;
            }
        }
    }
}

/// Turns a streamed (2xx) response into chunks, `parser` deciding what each event means.
pub(crate) fn chunk_stream<P>(provider: &str, response: reqwest::Response, parser: P) -> ChunkStream
where
    P: FnMut(SseEvent) -> Result<SseStep, ProviderError> + Send + 'static,
{
    let state = State {
        provider: provider.to_string(),
        body: Box::pin(response.bytes_stream()),
        decoder: SseDecoder::default(),
        parser,
        ready: VecDeque::new(),
        finished: false,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(item) = state.ready.pop_front() {
                return Some((item, state));
            }
            if state.finished {
                return None;
            }
            state.read_more().await;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(text: &str, piece: usize) -> Vec<SseEvent> {
        let mut decoder = SseDecoder::default();
        let mut events = Vec::new();
        for bytes in text.as_bytes().chunks(piece) {
            events.extend(decoder.push(bytes).unwrap());
        }
        events.extend(decoder.finish().unwrap());
        events
    }

    #[test]
    fn any_split_gives_the_same_events() {
        let text = ": keep-alive\r\nevent: message_start\r\ndata: {\"a\":\"héllo\"}\r\n\r\ndata: one\ndata: two\n\ndata: [DONE]\n\n";
        let whole = decode_in_pieces(text, text.len());
        assert_eq!(
            whole,
            vec![
                SseEvent { event: Some("message_start".into()), data: "{\"a\":\"héllo\"}".into() },
                SseEvent { event: None, data: "one\ntwo".into() },
                SseEvent { event: None, data: "[DONE]".into() },
            ]
        );
        for piece in 1..text.len() {
            assert_eq!(decode_in_pieces(text, piece), whole, "split every {piece} bytes");
        }
    }

    #[test]
    fn unterminated_last_event_is_flushed() {
        assert_eq!(decode_in_pieces("data: x", 3), vec![SseEvent { event: None, data: "x".into() }]);
        assert_eq!(decode_in_pieces("data: x\n", 3), vec![SseEvent { event: None, data: "x".into() }]);
    }
}
