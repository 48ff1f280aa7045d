//! Hostile peers and clients against real nodes in one process on loopback: each module speaks
//! the node's protocols (HTTP, the overlay's) with malformed and abusive messages, and checks that
//! the node refuses them, keeps serving (a node that crashed would take this test process with
//! it), and takes in nothing it should not.

mod support;

#[path = "hostile/gossip.rs"]
mod gossip;
#[path = "hostile/limits.rs"]
mod limits;
#[path = "hostile/wire.rs"]
mod wire;
