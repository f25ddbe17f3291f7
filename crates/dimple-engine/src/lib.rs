//! The diffusion decoding engine: per-request unmasking policies, sequences and their
//! state, the step scheduler, the prefix-cache pool and the engine loop.

pub mod policy;
