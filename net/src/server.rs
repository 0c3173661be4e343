//! Listener (being written).
