//! BabyAI-Text. (being written)

pub mod world;
