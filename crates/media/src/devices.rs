//! Real audio devices (placeholder replaced below).
