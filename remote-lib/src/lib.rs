//! `remote-lib`: everything reusable in a Nix remote-build hook.
//!
//! Layers (see `docs/architecture.md`):
//! - decide (pure, plus the load directory): [`hook_protocol`], [`machines`],
//!   [`select`], [`slots`], [`health`];
//! - move bytes: [`transport`], [`serve`], [`copy`], [`nar`], [`wire`],
//!   [`local_store`], [`sample`];
//! - know things: [`derivation`], [`store_path`], [`hash`], [`nixlog`].
//!
//! The library never prints: it returns values and errors, and the binary
//! owns stderr.

pub mod compress;
pub mod copy;
pub mod derivation;
pub mod hash;
pub mod health;
pub mod hook_protocol;
pub mod job;
pub mod local_store;
pub mod machines;
pub mod nar;
pub mod nixlog;
pub mod path_info;
pub mod sample;
pub mod select;
pub mod serve;
pub mod session;
pub mod slots;
pub mod store_path;
pub mod transport;
pub mod wire;

/// The platform string of the machine this was compiled for, used when Nix
/// does not send `system`.
pub const LOCAL_SYSTEM: &str = concat!(env!("BUILD_HOOK_ARCH"), "-linux");
