//! The benchmarks behind `apprentice bench ...` and their baselines.
//!
//! - [`serve`]: `apprentice bench serve`, K concurrent agent-like clients against a local model
//!   through the gateway, next to llama.cpp single stream on the same GGUF and prompt ids.
//!
//! Baselines in other languages are scripts shipped in `baselines/` and embedded in the binary
//! (`include_str!`); they run as subprocesses and print one JSON line. A missing interpreter or
//! package becomes a row note naming the install command; our own numbers are always measured.

pub mod serve;
