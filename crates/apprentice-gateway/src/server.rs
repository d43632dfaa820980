//! The gateway process: shared state, routes, and a shutdown that loses nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use apprentice_core::Config;
use apprentice_store::{Recorder, SqliteStore, Store, StoreError};
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

use crate::api;
use crate::metrics::Metrics;
use crate::providers::{build_routers, ModelRouter, ProviderError};

/// Everything a request handler needs, shared by all of them.
pub struct Gateway {
    pub config: Arc<Config>,
    pub routers: BTreeMap<String, Arc<ModelRouter>>,
    pub store: Arc<dyn Store>,
    pub recorder: Arc<Recorder>,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot open the store at {path}: {source}")]
    Store { path: String, source: StoreError },
    #[error("invalid provider configuration: {0}")]
    Provider(#[from] ProviderError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("server error: {0}")]
    Serve(std::io::Error),
    #[error("could not flush the write queue at shutdown: {0}")]
    Flush(StoreError),
}

impl Gateway {
    /// Opens the store named in the config and builds every model's router.
    pub async fn open(config: Config) -> Result<Arc<Self>, GatewayError> {
        let path = config.store.path.clone();
        let store = SqliteStore::open(&path, config.store.write_mode)
            .await
            .map_err(|source| GatewayError::Store { path: path.display().to_string(), source })?;
        Self::with_store(config, Arc::new(store))
    }

    pub fn with_store(config: Config, store: Arc<dyn Store>) -> Result<Arc<Self>, GatewayError> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ProviderError::Config { provider: "http client".into(), message: e.to_string() })?;
        let routers = build_routers(&config, &client)?;
        let metrics = Arc::new(Metrics::default());
        let observer = {
            let metrics = metrics.clone();
            Arc::new(move |elapsed, records| metrics.store_write(elapsed, records)) as apprentice_store::WriteObserver
        };
        let recorder = Arc::new(Recorder::spawn(
            store.clone(),
            config.store.write_mode,
            config.store.queue_capacity,
            Some(observer),
        ));
        Ok(Arc::new(Self { config: Arc::new(config), routers, store, recorder, metrics }))
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .route("/inference", post(api::native::inference))
            .route("/feedback", post(api::native::feedback))
            .route("/v1/chat/completions", post(api::openai::chat_completions))
            .route("/openai/v1/chat/completions", post(api::openai::chat_completions))
            .route("/v1/models", get(api::openai::models))
            .layer(middleware::from_fn_with_state(self.clone(), observe))
            .with_state(self.clone())
    }
}

async fn health(State(gateway): State<Arc<Gateway>>) -> Response {
    match gateway.store.count_inferences().await {
        Ok(_) => axum::Json(serde_json::json!({"status": "ok"})).into_response(),
        Err(e) => crate::error::ApiError::store(e.to_string()).into_response(),
    }
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    let mut text = gateway.metrics.render();
    crate::metrics::render_local_models(&mut text, &crate::providers::local::loaded_model_stats());
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn observe(State(gateway): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let endpoint =
        request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    gateway.metrics.observe_request(&endpoint, response.status().as_u16(), started.elapsed());
    response
}

/// Binds the configured address (or `bind` when given) and serves until SIGINT/SIGTERM, then
/// drains in-flight requests and flushes the write queue before returning.
pub async fn serve(
    gateway: Arc<Gateway>,
    bind: Option<SocketAddr>,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), GatewayError> {
    let addr = bind.unwrap_or(gateway.config.gateway.bind);
    let listener = TcpListener::bind(addr).await.map_err(|source| GatewayError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(GatewayError::Serve)?;
    on_ready(local);
    axum::serve(listener, gateway.router())
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(GatewayError::Serve)?;
    gateway.recorder.shutdown().await.map_err(GatewayError::Flush)?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down: draining requests and flushing the write queue");
}

/// A gateway serving on a loopback port in the background: for demos, benchmarks and tests.
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), std::io::Error>>,
}

impl RunningGateway {
    pub async fn start(gateway: Arc<Gateway>, addr: SocketAddr) -> Result<Self, GatewayError> {
        let listener = TcpListener::bind(addr).await.map_err(|source| GatewayError::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(GatewayError::Serve)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = gateway.router();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self { addr, gateway, stop: Some(stop), task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting requests, lets in-flight ones finish, and flushes the write queue.
    pub async fn shutdown(mut self) -> Result<(), GatewayError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result.map_err(GatewayError::Serve)?,
            Err(e) => return Err(GatewayError::Serve(std::io::Error::other(e))),
        }
        self.gateway.recorder.shutdown().await.map_err(GatewayError::Flush)
    }
}
