//! Typed message payloads.
