//! Safe verbs layer (in progress).
