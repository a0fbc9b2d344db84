//! The slot server: any [`crate::Backend`] over HTTP (`rollbox serve`).

pub mod api;
