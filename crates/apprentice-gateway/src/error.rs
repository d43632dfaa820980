//! Client-facing errors: every one is JSON, names the offending field where there is one, and
//! uses a 4xx status for the client's mistakes. 5xx is reserved for upstream and store failures.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// A stable machine-readable kind, e.g. `invalid_request`, `unknown_function`.
    pub kind: &'static str,
    /// JSON path of the offending field in the request, e.g. `input.messages[0].content[1]`.
    pub field: Option<String>,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(kind: &'static str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, kind, field: Some(field.into()), message: message.into() }
    }

    pub fn not_found(kind: &'static str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, kind, field: Some(field.into()), message: message.into() }
    }

    pub fn upstream(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_GATEWAY, kind: "upstream_error", field: None, message: message.into() }
    }

    pub fn store(message: impl Into<String>) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, kind: "store_error", field: None, message: message.into() }
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "field": self.field}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}: {}", field, self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.to_json())).into_response()
    }
}

impl From<apprentice_store::StoreError> for ApiError {
    fn from(e: apprentice_store::StoreError) -> Self {
        ApiError::store(e.to_string())
    }
}

/// Parses a JSON body, reporting the path of the first field that does not fit.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path == "." { "body".to_string() } else { path };
        let kind = if inner.is_syntax() || inner.is_eof() { "invalid_json" } else { "invalid_request" };
        ApiError::bad_request(kind, field, inner.to_string())
    })
}
