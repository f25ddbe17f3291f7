//! Types shared by every Dimple crate: validated decode parameters and structure priors
//! (`params`), and the image-size rule that turns a width and height into a token count
//! (`image_size`). No tensors, no I/O.

pub mod builtin;
pub mod image_size;
pub mod params;
