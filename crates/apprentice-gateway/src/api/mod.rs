//! The HTTP APIs: apprentice's native one and the OpenAI-compatible one.

pub mod native;
pub mod openai;
