//! spiffe_id
