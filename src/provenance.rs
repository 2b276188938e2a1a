//! Where a result comes from: the commit and build of `meet`, the machine, and the kernels that
//! computed it. Numbers are bit-for-bit reproducible only by the same kernels summing in the same
//! order, so results record what decides that ([`Provenance::numerics`]) next to the rest.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// `meet`'s version and the commit it was built from (`+dirty` when its sources differed).
    pub meet: String,
    pub commit: String,
    /// Cargo features of the build (`cuda`), and the target.
    pub build: Vec<String>,
    /// The processor's name (`/proc/cpuinfo`), or `unknown`.
    pub cpu: String,
    pub numerics: Numerics,
}

/// What decides the exact floating-point results of a run on the CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Numerics {
    /// The widest of `meet`'s own vector kernels in use: `avx512`, `avx2` or `scalar` (the CPU's
    /// best, capped by `MEET_SIMD`).
    pub kernels: String,
    /// Where bf16 products run (`[train] dtype = "bf16"` only): `amx`, `avx512-bf16`, or
    /// `f32-kernels` (the rounded operands multiplied by the f32 kernels).
    pub bf16_products: String,
    /// Whether the `gemm` crate's f32 products run their AVX-512 kernels (the CPU has AVX-512 F;
    /// they cannot be capped).
    pub gemm_avx512: bool,
    /// Kernel threads (`MEET_THREADS`, else the cores): products are split over them.
    pub threads: usize,
}

impl Provenance {
    /// This build on this machine.
    pub fn current() -> Provenance {
        let dirty = option_env!("MEET_COMMIT_DIRTY") == Some("true");
        let commit = option_env!("MEET_COMMIT").unwrap_or("unknown");
        let mut build = vec![format!("target {}-{}", std::env::consts::ARCH, std::env::consts::OS)];
        if cfg!(feature = "cuda") {
            build.push("feature cuda".into());
        }
        Provenance {
            meet: env!("CARGO_PKG_VERSION").into(),
            commit: if dirty { format!("{commit}+dirty") } else { commit.into() },
            build,
            cpu: cpu_name(),
            numerics: Numerics {
                kernels: crate::nn::simd::kernel_level().into(),
                bf16_products: crate::nn::bf16::kernel().name().into(),
                gemm_avx512: gemm_avx512(),
                threads: crate::nn::team::Team::global().threads(),
            },
        }
    }

    /// One line for a report: commit, build, CPU and kernels.
    pub fn line(&self) -> String {
        format!(
            "meet {} (commit {}; {}) on {}: {} kernels{}, bf16 products on {}, {} threads",
            self.meet,
            self.commit,
            self.build.join(", "),
            self.cpu,
            self.numerics.kernels,
            if self.numerics.gemm_avx512 { ", AVX-512 f32 products" } else { "" },
            self.numerics.bf16_products,
            self.numerics.threads
        )
    }
}

fn gemm_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().into())
        })
        .unwrap_or_else(|| "unknown".into())
}
