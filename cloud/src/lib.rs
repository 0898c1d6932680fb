//! # edgesync-cloud
