//! The public-facing side: prompt building (tokenizer and chat template).

pub mod prompt;
