//! Server-sent events for streamed inferences, shared by the native and OpenAI-compatible APIs.
//!
//! The stream runs in its own task: if the client goes away mid-answer, the model's answer is
//! still consumed and recorded. The final event is sent only after the record is written, so a
//! client that saw the end of the stream holds an acknowledged inference.

use std::convert::Infallible;
use std::sync::Arc;

use apprentice_core::InferenceRecord;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::inference::Prepared;
use crate::providers::{ChunkStream, StreamAccumulator, StreamChunk};
use crate::server::Gateway;

/// How one API spells its stream events.
pub trait StreamFormat: Send + 'static {
    fn chunk(&mut self, prepared: &Prepared, chunk: &StreamChunk) -> Option<Value>;
    fn finish(&mut self, record: &InferenceRecord) -> Option<Value>;
    fn error(&mut self, error: &crate::error::ApiError) -> Value {
        error.to_json()
    }
}

pub fn respond<F: StreamFormat>(
    gateway: Arc<Gateway>,
    prepared: Prepared,
    provider_name: String,
    mut upstream: ChunkStream,
    mut format: F,
) -> impl IntoResponse {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let send = |value: Value| {
            let tx = tx.clone();
            async move {
                // A closed channel means the client left; keep going so the inference is recorded.
                let _ = tx.send(Ok(Event::default().data(value.to_string()))).await;
            }
        };
        let mut accumulator = StreamAccumulator::default();
        let mut ttft = None;
        while let Some(item) = upstream.next().await {
            match item {
                Ok(chunk) => {
                    if ttft.is_none() && (chunk.text.is_some() || !chunk.tool_calls.is_empty()) {
                        ttft = Some(prepared.elapsed());
                    }
                    accumulator.push(&chunk);
                    if let Some(event) = format.chunk(&prepared, &chunk) {
                        send(event).await;
                    }
                }
                Err(e) => {
                    gateway.metrics.provider_error(&prepared.model_name, &provider_name);
                    let error = crate::error::ApiError::upstream(format!("stream broke off: {e}"));
                    send(format.error(&error)).await;
                    return;
                }
            }
        }
        let response = accumulator.finish();
        match gateway.finish(prepared, provider_name, response, ttft).await {
            Ok(completed) => {
                if let Some(event) = format.finish(&completed.record) {
                    send(event).await;
                }
                let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
            }
            Err(error) => send(format.error(&error)).await,
        }
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}
