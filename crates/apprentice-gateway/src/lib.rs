//! The apprentice gateway: sits between an application and its models, renders structured inputs
//! with the chosen variant's templates, calls the model's providers in routing order, and records
//! every call and every piece of feedback in the store.

pub mod api;
pub mod bench;
pub mod error;
pub mod inference;
pub mod metrics;
pub mod providers;
pub mod server;
pub mod stream;

pub use server::{serve, Gateway, GatewayError, RunningGateway};
