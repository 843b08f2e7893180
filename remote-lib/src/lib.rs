//! `remote-lib`: everything reusable in a Nix remote-build hook.
//!
//! Layers (see `docs/architecture.md`):
//! - decide (pure, plus the load directory): [`hook_protocol`], [`machines`],
//!   [`select`], [`slots`], [`health`], [`learn`];
//! - move bytes: [`transport`], [`held`], [`serve`], [`copy`], [`nar`], [`wire`],
//!   [`local_store`], [`sample`], [`cpu`];
//! - know things: [`derivation`], [`store_path`], [`hash`], [`nixlog`].
//!
//! The library never prints: it returns values and errors, and the binary
//! owns stderr.

pub mod bridge;
pub mod compress;
pub mod copy;
pub mod cpu;
pub mod derivation;
pub mod drain;
pub mod hash;
pub mod health;
pub mod held;
pub mod history;
pub mod hook_protocol;
pub mod job;
pub mod learn;
pub mod local_store;
pub mod machines;
pub mod nar;
pub mod nixconf;
pub mod nixlog;
pub mod path_info;
pub mod sample;
pub mod select;
pub mod serve;
pub mod session;
pub mod simulate;
pub mod slots;
pub mod store_path;
pub mod transport;
pub mod wire;
pub mod worker;

/// Nix's platform string for the machine this was compiled for (its
/// `system`), used when Nix does not send the `system` setting.
pub const LOCAL_SYSTEM: &str = local_system();

const fn local_system() -> &'static str {
    macro_rules! pick {
        ($($arch:literal => $nix:literal),* $(,)?) => {{
            let linux = cfg!(target_os = "linux");
            let darwin = cfg!(target_os = "macos");
            $(
                if cfg!(target_arch = $arch) && linux {
                    return concat!($nix, "-linux");
                }
                if cfg!(target_arch = $arch) && darwin {
                    return concat!($nix, "-darwin");
                }
            )*
            "unknown-system"
        }};
    }
    pick!("x86_64" => "x86_64", "aarch64" => "aarch64", "x86" => "i686", "arm" => "armv7l", "riscv64" => "riscv64", "powerpc64" => "powerpc64le")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_local_system_is_a_nix_system_string() {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        assert_eq!(super::LOCAL_SYSTEM, "x86_64-linux");
        #[cfg(all(target_arch = "aarch64", target_os = "macos"))]
        assert_eq!(super::LOCAL_SYSTEM, "aarch64-darwin");
        assert!(super::LOCAL_SYSTEM.contains('-'));
    }
}
