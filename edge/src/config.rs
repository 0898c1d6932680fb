//! Agent configuration.
