//! Hostile peers and clients against real nodes in one process on loopback: each module speaks
//! the node's protocols (HTTP, the overlay's) with malformed and abusive messages, and checks that
//! the node refuses them and keeps serving.

mod support;

#[path = "hostile/limits.rs"]
mod limits;
