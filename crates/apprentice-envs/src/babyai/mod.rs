//! BabyAI-Text. (being written)
