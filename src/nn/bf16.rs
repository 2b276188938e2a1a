//! Matrix products with bf16 operands and f32 accumulation: what PyTorch's CPU autocast does with
//! a matmul. Operands are rounded to bf16 (round to nearest even), products are exact in f32 and
//! summed in f32.
//!
//! Three kernels, the best the CPU has ([`kernel`]), all on the same packed operands:
//! - AMX-BF16 (Intel Sapphire Rapids and later): one `tdpbf16ps` is 16 x 16 x 32 multiply-adds,
//!   ~10x the f32 FMA peak of a core (`scripts/cpu_ceiling.c`).
//! - AVX512_BF16 (AMD Zen 4/5, Intel Cooper Lake): `vdpbf16ps` does two multiply-adds per f32
//!   lane. On Zen 5 its GEMM register tile runs at 1.8x the f32 one (`scripts/cpu_ceiling.c`:
//!   178 against 97 GFLOP/s per core); on Intel cores it about ties two `vfmadd`s, and AMX is
//!   used there anyway.
//! - Elsewhere the operands are rounded the same way and multiplied by the f32 kernels
//!   ([`crate::nn::gemm`]): the same products and f32 sums, in another order.

use crate::nn::gemm::sgemm;
use crate::nn::team::{SharedMut, Team};

thread_local! {
    static AUTOCAST: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the returned guard lives, [`sgemm_autocast`] on this thread (every dense product of the layers,
/// their backward and the fused LM-head loss) multiplies bf16-rounded operands with f32 sums, as
/// inside PyTorch's `torch.autocast("cpu", torch.bfloat16)`; with `on = false` it changes nothing.
/// Norms, softmax, losses and the optimizer stay in f32; attention's products run on the kernel
/// team's threads and stay f32 too. Guards nest: dropping one restores the previous state.
pub fn autocast(on: bool) -> Autocast {
    Autocast(AUTOCAST.with(|a| a.replace(on || a.get())))
}

/// Restores the autocast state it replaced when dropped (see [`autocast`]).
pub struct Autocast(bool);

impl Drop for Autocast {
    fn drop(&mut self) {
        AUTOCAST.with(|a| a.set(self.0));
    }
}

/// Whether products on this thread run in bf16 (inside an [`autocast`] guard).
pub fn autocast_on() -> bool {
    AUTOCAST.with(|a| a.get())
}

/// [`sgemm`] (same arguments), or [`gemm`] with f32 operands rounded to bf16 inside an
/// [`autocast`] guard: the product every layer, its backward and the fused LM-head loss call.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_autocast(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    c: &mut [f32],
    accumulate: bool,
) {
    if autocast_on() {
        gemm(m, n, k, Src::F32(a), a_t, Src::F32(b), b_t, c, accumulate)
    } else {
        sgemm(m, n, k, a, a_t, b, b_t, c, accumulate)
    }
}

/// Which kernel multiplies bf16 operands in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX512_BF16 dot products (`vdpbf16ps`).
    Avx512Bf16,
    /// The rounded operands multiplied by the f32 kernels.
    F32,
}

impl Kernel {
    /// The name recorded in a run's provenance.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Avx512Bf16 => "avx512-bf16",
            Kernel::F32 => "f32-kernels",
        }
    }
}

/// The kernel bf16 products use here: AMX where the CPU and the kernel allow it and `MEET_SIMD`
/// does not cap it below `amx`; else AVX512_BF16 unless capped below `avx512`; else the f32
/// kernels (so `MEET_SIMD=avx2` tests the fallback on any machine).
pub fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        static K: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *K.get_or_init(|| {
            if tiled::amx_available() {
                Kernel::Amx
            } else if tiled::avx512_bf16_available() {
                Kernel::Avx512Bf16
            } else {
                Kernel::F32
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Kernel::F32
}

/// `x` rounded to the nearest bf16 (ties to even), as its upper 16 bits; NaN stays a quiet NaN.
/// The same as `half::bf16::from_f32` (the tests check it), written without branches so that the
/// packing loops vectorise.
#[inline(always)]
pub fn to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((b >> 16) | 0x40) as u16;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        quiet_nan
    } else {
        rounded
    }
}

/// `x` rounded to bf16 and back to f32.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((to_bf16_bits(x) as u32) << 16)
}

/// How many of `values` lie exactly halfway between two bf16 values (the low 16 bits of the f32
/// are `0x8000`). Weights dequantized from a block-quantized GGUF (scale x small integer +
/// offset) often do: 8.1% of SmolLM2-135M-Instruct.Q4_1.gguf's weights. Rounding to nearest even
/// then turns any update, however small, into half a bf16 step in the update's direction on them.
pub fn tie_count(values: &[f32]) -> usize {
    values.iter().filter(|v| v.to_bits() & 0xffff == 0x8000).count()
}

/// The share of `values` that are ties ([`tie_count`]); 0 for none.
pub fn tie_share(values: &[f32]) -> f64 {
    tie_count(values) as f64 / values.len().max(1) as f64
}

/// A matrix operand: f32 (rounded to bf16 while it is packed) or already bf16 (a frozen weight
/// stored that way), row-major.
#[derive(Clone, Copy)]
pub enum Src<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Src<'_> {
    fn len(&self) -> usize {
        match self {
            Src::F32(v) => v.len(),
            Src::Bf16(v) => v.len(),
        }
    }

    /// The first `len` values as the f32 values of their bf16 roundings.
    fn widen(&self, len: usize) -> Vec<f32> {
        fn widen<T: Bits>(v: &[T]) -> Vec<f32> {
            v.iter().map(|x| f32::from_bits((x.bits() as u32) << 16)).collect()
        }
        match self {
            Src::F32(v) => widen(&v[..len]),
            Src::Bf16(v) => widen(&v[..len]),
        }
    }
}

/// An element that packs into bf16: f32 (rounded) or bf16 bits.
trait Bits: Copy + Send + Sync {
    fn bits(self) -> u16;
    /// The values as f32, for the vectorised packing (rounded 16 at a time).
    fn as_f32(v: &[Self]) -> Option<&[f32]>;
}

impl Bits for f32 {
    #[inline(always)]
    fn bits(self) -> u16 {
        to_bf16_bits(self)
    }
    fn as_f32(v: &[f32]) -> Option<&[f32]> {
        Some(v)
    }
}

impl Bits for u16 {
    #[inline(always)]
    fn bits(self) -> u16 {
        self
    }
    fn as_f32(_: &[u16]) -> Option<&[f32]> {
        None
    }
}

/// Fewest multiply-adds (`m n k`) a product needs to go to a tiled kernel: smaller ones multiply
/// the rounded operands on the f32 kernels.
const TILED_MIN_WORK: usize = 1 << 15;

/// `c[m, n] = (accumulate ? c : 0) + op(a) · op(b)` with bf16 operands and f32 sums, all
/// row-major; `op(a)` is `a[m, k]` or `a[k, m]ᵀ` (`a_t`), `op(b)` is `b[k, n]` or `b[n, k]ᵀ`
/// (`b_t`), as [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub fn gemm(m: usize, n: usize, k: usize, a: Src, a_t: bool, b: Src, b_t: bool, c: &mut [f32], accumulate: bool) {
    gemm_on(kernel(), m, n, k, a, a_t, b, b_t, c, accumulate)
}

/// [`gemm`] on a given kernel (one the CPU has): the tests run each.
#[allow(clippy::too_many_arguments)]
fn gemm_on(
    kernel: Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: Src,
    a_t: bool,
    b: Src,
    b_t: bool,
    c: &mut [f32],
    accumulate: bool,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "bf16 gemm: buffers too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::F32 && m * n * k >= TILED_MIN_WORK {
        tiled::gemm(kernel, m, n, k, a, a_t, tiled::Right::Pack(b, b_t), c, accumulate);
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kernel;
    // The same bf16 operands, multiplied and summed in f32 by the f32 kernels.
    sgemm(m, n, k, &a.widen(m * k), a_t, &b.widen(k * n), b_t, c, accumulate);
}

/// A frozen right operand `op(b)` (`k x n`) packed once for the bf16 kernels (bf16, half the
/// memory of its f32 source): a frozen layer's weight, used by every product of a run.
pub struct PackedB {
    #[cfg(target_arch = "x86_64")]
    inner: tiled::Packed,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB {:?}", self.dims())
    }
}

impl PackedB {
    /// `op(b)` packed, or `None` where products run on the f32 kernels (then [`gemm`] is the
    /// way).
    pub fn new(k: usize, n: usize, b: Src, b_t: bool) -> Option<PackedB> {
        assert!(b.len() >= k * n, "bf16 pack: buffer too small");
        #[cfg(target_arch = "x86_64")]
        if kernel() != Kernel::F32 && k > 0 && n > 0 {
            return Some(PackedB { inner: tiled::Packed::new(k, n, b, b_t) });
        }
        None
    }

    /// `(k, n)` of `op(b)`.
    pub fn dims(&self) -> (usize, usize) {
        #[cfg(target_arch = "x86_64")]
        return (self.inner.k, self.inner.n);
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("PackedB exists only on x86-64")
    }

    /// `c[m, n] = (accumulate ? c : 0) + op(a) · B`, as [`gemm`] with this packed right operand.
    pub fn gemm(&self, m: usize, a: Src, a_t: bool, c: &mut [f32], accumulate: bool) {
        let (k, n) = self.dims();
        assert!(a.len() >= m * k && c.len() >= m * n, "bf16 gemm: buffers too small");
        if m == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        tiled::gemm(kernel(), m, n, k, a, a_t, tiled::Right::Packed(&self.inner), c, accumulate);
    }
}

/// A left operand `op(a)` (`m x k`) packed once for several products (a layer's input times its
/// frozen weight and its LoRA adapter's `A`; the output gradient times `W` and `B`): each product
/// gives the bits [`gemm`] or [`PackedB::gemm`] gives with `a` itself, without packing `a` again.
pub struct PackedA<'a> {
    m: usize,
    k: usize,
    a: Src<'a>,
    a_t: bool,
    #[cfg(target_arch = "x86_64")]
    tiles: Option<tiled::PackedA>,
}

impl<'a> PackedA<'a> {
    /// `op(a)`, packed when products run on a tiled kernel.
    pub fn new(m: usize, k: usize, a: Src<'a>, a_t: bool) -> Self {
        assert!(a.len() >= m * k, "bf16 pack: buffer too small");
        #[cfg(target_arch = "x86_64")]
        let tiles = (kernel() != Kernel::F32 && m > 0 && k > 0).then(|| tiled::PackedA::new(m, k, a, a_t));
        PackedA {
            m,
            k,
            a,
            a_t,
            #[cfg(target_arch = "x86_64")]
            tiles,
        }
    }

    /// [`gemm`]`(m, n, k, a, a_t, b, b_t, c, accumulate)`.
    pub fn gemm(&self, n: usize, b: Src, b_t: bool, c: &mut [f32], accumulate: bool) {
        let (m, k) = (self.m, self.k);
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = &self.tiles {
            // The tiled path [`gemm_on`] would take.
            if n > 0 && m * n * k >= TILED_MIN_WORK {
                assert!(b.len() >= k * n && c.len() >= m * n, "bf16 gemm: buffers too small");
                tiled::multiply(kernel(), m, n, k, t.tiles(), tiled::Right::Pack(b, b_t), c, accumulate);
                return;
            }
        }
        gemm(m, n, k, self.a, self.a_t, b, b_t, c, accumulate)
    }

    /// `c (+)= op(a) B + op(a2) op(b2)` (`op(b2)` is `k2 x n`, `a2` packed with this `m`): the
    /// bits of [`PackedA::gemm_packed`] followed by `a2.gemm(n, b2, b2_t, c, true)`, but on the
    /// tiled kernels the second product is summed into each output block while it is still in
    /// registers, so `c` is written once instead of written, read back and written again (a
    /// LoRA layer's `x Wᵀ + (s x Aᵀ) Bᵀ` and `dy W + (s dy B) A`: the round trip of `c` cost more
    /// than the rank-64 product itself).
    pub fn gemm_packed_then(&self, b: &PackedB, a2: &PackedA, b2: Src, b2_t: bool, c: &mut [f32], accumulate: bool) {
        let (k, n) = b.dims();
        assert!(k == self.k, "bf16 gemm: a packed operand of depth {} for {k}", self.k);
        assert!(a2.m == self.m, "bf16 gemm: {} rows then {}", self.m, a2.m);
        #[cfg(target_arch = "x86_64")]
        if let (Some(t), Some(t2)) = (&self.tiles, &a2.tiles) {
            // Only where the second product alone would take the tiled path: else its bits are
            // the f32 kernels'.
            if self.m * n * a2.k >= TILED_MIN_WORK {
                assert!(b2.len() >= a2.k * n && c.len() >= self.m * n, "bf16 gemm: buffers too small");
                let tail = tiled::Tail { k: a2.k, apr: t2.tiles(), b: b2, b_t: b2_t };
                tiled::multiply_then(
                    kernel(),
                    self.m,
                    n,
                    k,
                    t.tiles(),
                    tiled::Right::Packed(&b.inner),
                    Some(tail),
                    c,
                    accumulate,
                );
                return;
            }
        }
        self.gemm_packed(b, c, accumulate);
        a2.gemm(n, b2, b2_t, c, true);
    }

    /// [`PackedB::gemm`]`(m, a, a_t, c, accumulate)` of `b`.
    pub fn gemm_packed(&self, b: &PackedB, c: &mut [f32], accumulate: bool) {
        let (k, n) = b.dims();
        assert!(k == self.k, "bf16 gemm: a packed operand of depth {} for {k}", self.k);
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = &self.tiles {
            assert!(c.len() >= self.m * n, "bf16 gemm: buffers too small");
            tiled::multiply(kernel(), self.m, n, k, t.tiles(), tiled::Right::Packed(&b.inner), c, accumulate);
            return;
        }
        b.gemm(self.m, self.a, self.a_t, c, accumulate)
    }
}

/// The AMX and AVX512_BF16 paths: both operands packed into bf16 tiles (AMX's layout, which is
/// also the pair-interleaved one `vdpbf16ps` wants), column panels of `op(b)` spread over the
/// kernel team; AMX multiplies 32 x 32 output blocks of four 16 x 16 f32 accumulator tiles,
/// AVX512_BF16 8 x 32 blocks of sixteen accumulator registers.
#[cfg(target_arch = "x86_64")]
mod tiled {
    use super::*;
    use std::ops::Range;

    /// Widest column panel of `op(b)` one job packs and multiplies at a time.
    const PANEL_MAX: usize = 320;

    /// The panel width for `n` columns: a multiple of 32 up to [`PANEL_MAX`], with a multiple of
    /// the team's threads as the number of panels, so that each thread gets an equal share (576
    /// columns on two threads: two panels of 288, where fixed 256-column panels gave one thread
    /// 512 columns and the other 64).
    fn panel_width(n: usize) -> usize {
        if n <= NARROW {
            return n.div_ceil(32) * 32;
        }
        let threads = Team::global().threads().max(1);
        let panels = n.div_ceil(threads * PANEL_MAX) * threads;
        n.div_ceil(32).div_ceil(panels).max(1) * 32
    }

    /// Widest `op(b)` kept as one panel, its rows shared out instead.
    const NARROW: usize = 64;

    /// Most depths summed per packed panel (a `DEPTH x PANEL_MAX` bf16 panel is 480 KB, in L2; the
    /// 32 rows of `a` multiplied against it, 48 KB, mostly in L1). A longer `k` (1536 of an MLP's
    /// down projection, the LM head's 49152 in its backward) is cut in even slices summed one
    /// after the other into `c`.
    const DEPTH: usize = 768;

    /// Whether a product is tall: far more rows than columns, its right operand small enough to
    /// pack whole for each job (one panel of every column, one depth slice). Its jobs then split
    /// the rows, so that the packed left operand is read once in all instead of once per
    /// column panel (the LM head's weight gradient `dlogitsᵀ h`: 49152 x 576, depth 512, where
    /// the packed `dlogitsᵀ` is 50 MB). Each job packs `op(b)` again (0.6 MB there, two jobs per
    /// thread so that a slowed thread does less), small against the 12 MB of packed `dlogitsᵀ`
    /// each job multiplies; one shared packed copy would leave the other threads idle while one
    /// packs it.
    pub fn tall_product(m: usize, n: usize, k: usize) -> bool {
        m >= 16 * n && n <= 2 * PANEL_MAX && k <= DEPTH && n > NARROW
    }

    /// The depth of each slice of `k` (a multiple of 32; the last slice may be shorter).
    fn slice_depth(k: usize) -> usize {
        k.div_ceil(k.div_ceil(DEPTH)).div_ceil(32) * 32
    }

    /// `len` elements of `v` starting on a 64-byte boundary (`v` grown as needed): a tile row
    /// that straddles two cache lines halves the speed of tile loads (measured: ~1400 against
    /// ~720 GFLOP/s per core for the same kernel), and a `Vec` is only 16-byte aligned.
    fn aligned<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
        let spare = 64 / std::mem::size_of::<T>();
        if v.len() < len + spare {
            v.resize(len + spare, T::default());
        }
        let off = v.as_ptr().align_offset(64);
        &mut v[off..off + len]
    }

    /// The right operand of a product: packed on the fly, or once ahead.
    pub enum Right<'a> {
        Pack(Src<'a>, bool),
        Packed(&'a Packed),
    }

    /// `op(b)` packed panel by panel and slice by slice, as [`pack_b`] lays each out.
    pub struct Packed {
        pub k: usize,
        pub n: usize,
        /// Columns per panel ([`panel_width`]).
        width: usize,
        /// The blocks, from `data[start]` (64-byte aligned).
        data: Vec<u32>,
        start: usize,
        /// Start of block `(panel, slice)` at `start + offsets[panel * slices + slice]`.
        offsets: Vec<usize>,
    }

    impl Packed {
        pub fn new(k: usize, n: usize, b: Src, b_t: bool) -> Packed {
            let (per, width) = (slice_depth(k), panel_width(n));
            let panels = n.div_ceil(width);
            let slices = k.div_ceil(per);
            let mut offsets = Vec::with_capacity(panels * slices);
            let mut total = 0;
            for p in 0..panels {
                let cols = (((p + 1) * width).min(n) - p * width).div_ceil(32) * 32;
                for s in 0..slices {
                    offsets.push(total);
                    total += (((s + 1) * per).min(k) - s * per).div_ceil(32) * 16 * cols;
                }
            }
            let mut data: Vec<u32> = Vec::new();
            let out = SharedMut(aligned(&mut data, total).as_mut_ptr());
            let offsets_ref = &offsets;
            Team::global().for_ranges(panels, 1, &|range| {
                let out = &out;
                for p in range {
                    let cols = p * width..((p + 1) * width).min(n);
                    for s in 0..slices {
                        let o = offsets_ref[p * slices + s];
                        let end = offsets_ref.get(p * slices + s + 1).copied().unwrap_or(total);
                        // SAFETY: blocks are disjoint and each is packed by one thread; the CPU
                        // has AVX-512 (AMX CPUs do).
                        unsafe {
                            let dst = std::slice::from_raw_parts_mut(out.0.add(o), end - o);
                            let depth = s * per..((s + 1) * per).min(k);
                            match b {
                                Src::F32(v) => pack_b(k, n, v, b_t, cols.clone(), depth, dst),
                                Src::Bf16(v) => pack_b(k, n, v, b_t, cols.clone(), depth, dst),
                            }
                        }
                    }
                }
            });
            let start = data.as_ptr().align_offset(64);
            Packed { k, n, width, data, start, offsets }
        }
    }
    /// One tile: 16 rows of 64 bytes, stored contiguously in both packed operands so that a tile
    /// load reads 1 KB of consecutive lines.
    const TILE: usize = 1024;

    /// Whether the CPU has AMX-BF16, the kernel lets this process use the tile state, and
    /// `MEET_SIMD` allows it (`MEET_SIMD=avx512` or lower takes another kernel).
    pub fn amx_available() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE (std's detection of them is
            // not stable yet).
            let edx = crate::nn::simd::has_avx2().then(|| std::arch::x86_64::__cpuid_count(7, 0).edx);
            let cpu = edx.is_some_and(|d| d & (1 << 22) != 0 && d & (1 << 24) != 0);
            if !(cpu && crate::nn::simd::simd_allows("amx")) {
                return false;
            }
            // Linux hands out the 8 KB tile state only on request (arch_prctl
            // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA), once per process.
            // SAFETY: a plain system call with integer arguments.
            let r = unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1023, 18) };
            if r != 0 {
                tracing::warn!("the kernel refused AMX tile state; bf16 products use another kernel");
            }
            r == 0
        })
    }

    /// Whether the CPU has AVX512_BF16 (with the F/BW/VL the packing uses) and `MEET_SIMD`
    /// allows `avx512`.
    pub fn avx512_bf16_available() -> bool {
        crate::nn::simd::has_avx512()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }

    use std::arch::x86_64::*;

    /// [`to_bf16_bits`] of 16 f32 at `p`, each in the low half of a 32-bit lane.
    ///
    /// # Safety
    /// AVX-512 F; 16 f32 readable at `p`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn round16(p: *const f32) -> __m512i {
        let b = _mm512_loadu_si512(p as *const __m512i);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))));
        let nan = _mm512_cmpgt_epu32_mask(
            _mm512_and_si512(b, _mm512_set1_epi32(0x7fff_ffff)),
            _mm512_set1_epi32(0x7f80_0000),
        );
        let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
        _mm512_mask_mov_epi32(rounded, nan, quiet)
    }

    /// 16 words pairing two rows element by element: word `j` is `(lo[j], hi[j])` rounded.
    ///
    /// # Safety
    /// As [`round16`], at `lo` and `hi`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pair_rows(lo: *const f32, hi: *const f32) -> __m512i {
        _mm512_or_si512(round16(lo), _mm512_slli_epi32::<16>(round16(hi)))
    }

    /// [`pair_rows`] with one `vcvtne2ps2bf16` and a word shuffle.
    ///
    /// # Safety
    /// AVX-512 F/BW and AVX512_BF16; 16 f32 readable at `lo` and at `hi`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pair_rows_hw(lo: *const f32, hi: *const f32) -> __m512i {
        // Words 0..16 are `lo` rounded, 16..32 `hi`: interleave them.
        let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(hi), _mm512_loadu_ps(lo)));
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
            1, 16, 0,
        );
        _mm512_permutexvar_epi16(idx, halves)
    }

    /// 16 words pairing neighbours: word `j` is `(x[2j], x[2j + 1])` rounded, of 32 f32 at `p`.
    ///
    /// # Safety
    /// AVX-512 F/BW; 32 f32 readable at `p`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pair_neighbours(p: *const f32) -> __m512i {
        let lo = _mm512_cvtepi32_epi16(round16(p));
        let hi = _mm512_cvtepi32_epi16(round16(p.add(16)));
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    }

    /// [`pair_neighbours`] with one `vcvtne2ps2bf16` (its two halves are the 32 values in order).
    ///
    /// # Safety
    /// AVX-512 F and AVX512_BF16; 32 f32 readable at `p`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pair_neighbours_hw(p: *const f32) -> __m512i {
        std::mem::transmute(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p.add(16)), _mm512_loadu_ps(p)))
    }

    /// How the packing rounds f32 to bf16 words: [`Soft`] with integer arithmetic, exactly as
    /// [`to_bf16_bits`]; [`Hw`] with AVX512_BF16's `vcvtne2ps2bf16`, 32 values per instruction
    /// (it saved 4-7% of a full fine-tuning step in bf16). The two can differ only on f32
    /// denormals, which Intel documents `vcvtne2ps2bf16` as flushing to signed zeros (the Xeon
    /// this was measured on rounds them as [`Soft`] does): `tdpbf16ps` and `vdpbf16ps` take bf16
    /// denormal inputs as zeros in any case, so the products' bits are the same either way (the
    /// tests check the packings and the kernels).
    trait Round {
        /// [`pair_rows`].
        ///
        /// # Safety
        /// As [`pair_rows`], and AVX512_BF16 for [`Hw`].
        unsafe fn pair_rows(lo: *const f32, hi: *const f32) -> __m512i;
        /// [`pair_neighbours`].
        ///
        /// # Safety
        /// As [`pair_neighbours`], and AVX512_BF16 for [`Hw`].
        unsafe fn pair_neighbours(p: *const f32) -> __m512i;
    }

    struct Soft;
    struct Hw;

    impl Round for Soft {
        #[inline(always)]
        unsafe fn pair_rows(lo: *const f32, hi: *const f32) -> __m512i {
            pair_rows(lo, hi)
        }
        #[inline(always)]
        unsafe fn pair_neighbours(p: *const f32) -> __m512i {
            pair_neighbours(p)
        }
    }

    impl Round for Hw {
        #[inline(always)]
        unsafe fn pair_rows(lo: *const f32, hi: *const f32) -> __m512i {
            pair_rows_hw(lo, hi)
        }
        #[inline(always)]
        unsafe fn pair_neighbours(p: *const f32) -> __m512i {
            pair_neighbours_hw(p)
        }
    }

    /// `$soft` and `$hw`: the packing `$with` compiled for AVX-512 alone, rounding with [`Soft`],
    /// and with AVX512_BF16 too, rounding with [`Hw`] (each inlines its copy of the body).
    macro_rules! rounding_copies {
        ($soft:ident, $hw:ident, $with:ident, $what:ident, ($($arg:ident: $ty:ty),*)) => {
            #[doc = concat!("[`", stringify!($what), "`] rounding with [`Soft`].")]
            ///
            /// # Safety
            #[doc = concat!("As [`", stringify!($what), "`].")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            unsafe fn $soft<T: Bits>($($arg: $ty),*) {
                $with::<T, Soft>($($arg),*)
            }

            #[doc = concat!("[`", stringify!($what), "`] rounding with [`Hw`].")]
            ///
            /// # Safety
            #[doc = concat!("As [`", stringify!($what), "`], and the CPU has AVX512_BF16.")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
            unsafe fn $hw<T: Bits>($($arg: $ty),*) {
                $with::<T, Hw>($($arg),*)
            }
        };
    }

    /// Whether the packing rounds with AVX512_BF16 (the CPU has it and `MEET_SIMD` allows
    /// `avx512`).
    fn hw_rounding() -> bool {
        static HW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HW.get_or_init(avx512_bf16_available)
    }

    /// Transposes 16 x 16 32-bit words held as 16 rows.
    ///
    /// # Safety
    /// AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn transpose16(r: &mut [__m512i; 16]) {
        let mut t = [_mm512_setzero_si512(); 16];
        // Rows a, b, c, d of each group of four: interleave words, then word pairs, so that
        // r[4g + col] holds, in each 128-bit lane L, the group's four values of column 4L + col.
        for g in 0..4 {
            for h in 0..2 {
                t[4 * g + 2 * h] = _mm512_unpacklo_epi32(r[4 * g + 2 * h], r[4 * g + 2 * h + 1]);
                t[4 * g + 2 * h + 1] = _mm512_unpackhi_epi32(r[4 * g + 2 * h], r[4 * g + 2 * h + 1]);
            }
            r[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
            r[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
            r[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
            r[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
        }
        // Then gather lane L of the four groups into output row 4L + col.
        for c in 0..4 {
            t[c] = _mm512_shuffle_i32x4::<0x88>(r[c], r[4 + c]);
            t[4 + c] = _mm512_shuffle_i32x4::<0xdd>(r[c], r[4 + c]);
            t[8 + c] = _mm512_shuffle_i32x4::<0x88>(r[8 + c], r[12 + c]);
            t[12 + c] = _mm512_shuffle_i32x4::<0xdd>(r[8 + c], r[12 + c]);
        }
        for c in 0..4 {
            r[c] = _mm512_shuffle_i32x4::<0x88>(t[c], t[8 + c]);
            r[8 + c] = _mm512_shuffle_i32x4::<0xdd>(t[c], t[8 + c]);
            r[4 + c] = _mm512_shuffle_i32x4::<0x88>(t[4 + c], t[12 + c]);
            r[12 + c] = _mm512_shuffle_i32x4::<0xdd>(t[4 + c], t[12 + c]);
        }
    }

    /// Rows `rows` (from and to multiples of 16) of `op(a)` packed as whole tiles into `out`, the
    /// part of the packed matrix they own: tile `(i / 16, l / 32)` holds rows `i..i + 16` and
    /// depths `l..l + 32` as 16 x 32 bf16, at `((i / 16) * (k_pad / 32) + l / 32) * 512` of the
    /// whole; zero padded.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW (every AMX CPU does): the loops are compiled for it.
    unsafe fn pack_a<T: Bits>(
        m: usize,
        k: usize,
        a: &[T],
        a_t: bool,
        k_pad: usize,
        out: &mut [u16],
        rows: Range<usize>,
    ) {
        if hw_rounding() {
            pack_a_hw(m, k, a, a_t, k_pad, out, rows)
        } else {
            pack_a_soft(m, k, a, a_t, k_pad, out, rows)
        }
    }

    rounding_copies!(pack_a_soft, pack_a_hw, pack_a_with, pack_a,
        (m: usize, k: usize, a: &[T], a_t: bool, k_pad: usize, out: &mut [u16], rows: Range<usize>));

    /// The body of [`pack_a`], inlined into each rounding's copy (compiled for its features).
    ///
    /// # Safety
    /// As [`pack_a`], and the CPU has what `R` needs.
    #[inline(always)]
    unsafe fn pack_a_with<T: Bits, R: Round>(
        m: usize,
        k: usize,
        a: &[T],
        a_t: bool,
        k_pad: usize,
        out: &mut [u16],
        rows: Range<usize>,
    ) {
        // `out` holds exactly the tiles of `rows` (whole tiles: rows.start is a multiple of 16).
        let base = rows.start * k_pad;
        let at = |i: usize, l: usize| ((i / 16) * (k_pad / 32) + l / 32) * 512 + (i % 16) * 32 - base;
        let (last, full_k) = (rows.end.min(m), k / 32 * 32);
        for i in rows.clone() {
            if i >= m {
                (0..k_pad).step_by(32).for_each(|l| out[at(i, l)..at(i, l) + 32].fill(0));
                continue;
            }
            // The padded depths past k (a partial chunk is completed below).
            (k.div_ceil(32) * 32..k_pad).step_by(32).for_each(|l| out[at(i, l)..at(i, l) + 32].fill(0));
            if !k.is_multiple_of(32) {
                let l = k / 32 * 32;
                out[at(i, l) + k % 32..at(i, l) + 32].fill(0);
            }
        }
        let f = T::as_f32(a);
        if !a_t {
            // 32 depths of a row are one tile row: 16 words of neighbours.
            for i in rows.start..last {
                let done = if let Some(f) = f {
                    // SAFETY (loads and stores): depths l..l + 32 <= full_k <= k of row i < m lie
                    // in `a`; the tile row at `at(i, l)` is 32 u16 inside `out`.
                    for l in (0..full_k).step_by(32) {
                        let words = R::pair_neighbours(f.as_ptr().add(i * k + l));
                        _mm512_storeu_si512(out.as_mut_ptr().add(at(i, l)) as *mut __m512i, words);
                    }
                    full_k
                } else {
                    0
                };
                for l in (done..k).step_by(32) {
                    let src = &a[i * k + l..i * k + (l + 32).min(k)];
                    let o = at(i, l);
                    out[o..o + src.len()].iter_mut().zip(src).for_each(|(d, s)| *d = s.bits());
                }
            }
            return;
        }
        // `a` is `[k, m]`. Whole 16-row x 32-depth tiles of f32: two rows of `a` make a word
        // column (16 rows' depth pairs), 16 of them transposed into the tile's rows.
        let full_i = if f.is_some() { rows.start + (last.max(rows.start) - rows.start) / 16 * 16 } else { rows.start };
        if let Some(f) = f {
            // SAFETY: rows i0..i0 + 16 <= last <= m and depths l0..l0 + 32 <= k lie in `a`; each
            // tile row stored is 32 u16 inside `out`.
            for i0 in (rows.start..full_i).step_by(16) {
                for l0 in (0..full_k).step_by(32) {
                    let mut r = [_mm512_setzero_si512(); 16];
                    for (q, w) in r.iter_mut().enumerate() {
                        let lo = f.as_ptr().add((l0 + 2 * q) * m + i0);
                        *w = R::pair_rows(lo, lo.add(m));
                    }
                    transpose16(&mut r);
                    for (ii, w) in r.iter().enumerate() {
                        _mm512_storeu_si512(out.as_mut_ptr().add(at(i0 + ii, l0)) as *mut __m512i, *w);
                    }
                }
            }
        }
        // The rest through a 32 x 32 block, read and written a row at a time: the depths past the
        // whole tiles of the rows done above, then every depth of the remaining rows.
        let mut block = [[0u16; 32]; 32];
        for (irange, depths) in [(rows.start..full_i, full_k..k), (full_i..last, 0..k)] {
            for i0 in irange.clone().step_by(32) {
                let ni = (irange.end - i0).min(32);
                for l0 in depths.clone().step_by(32) {
                    let nl = (k - l0).min(32);
                    for ll in 0..nl {
                        let src = &a[(l0 + ll) * m + i0..(l0 + ll) * m + i0 + ni];
                        for (ii, s) in src.iter().enumerate() {
                            block[ii][ll] = s.bits();
                        }
                    }
                    for (ii, b) in block.iter().enumerate().take(ni) {
                        let o = at(i0 + ii, l0);
                        out[o..o + nl].copy_from_slice(&b[..nl]);
                    }
                }
            }
        }
    }

    /// Columns `cols` and depths `depth` of `op(b)` packed as AMX wants its right operand, in
    /// whole tiles: row `p` of the panel holds, as 32-bit word `j`, the pair
    /// `(op(b)[d + 2p, j], op(b)[d + 2p + 1, j])` for `d = depth.start`; tile `(j / 16, p / 16)`
    /// is 16 x 16 words at `((j / 16) * (pairs / 16) + p / 16) * 256`. Zero padded to `pairs`
    /// (a multiple of 16) rows and a multiple of 32 columns.
    ///
    /// # Safety
    /// As [`pack_a`].
    unsafe fn pack_b<T: Bits>(
        k: usize,
        n: usize,
        b: &[T],
        b_t: bool,
        cols: Range<usize>,
        depth: Range<usize>,
        out: &mut [u32],
    ) {
        if hw_rounding() {
            pack_b_hw(k, n, b, b_t, cols, depth, out)
        } else {
            pack_b_soft(k, n, b, b_t, cols, depth, out)
        }
    }

    rounding_copies!(pack_b_soft, pack_b_hw, pack_b_with, pack_b,
        (k: usize, n: usize, b: &[T], b_t: bool, cols: Range<usize>, depth: Range<usize>, out: &mut [u32]));

    /// The body of [`pack_b`], inlined into each rounding's copy.
    ///
    /// # Safety
    /// As [`pack_b`], and the CPU has what `R` needs.
    #[inline(always)]
    unsafe fn pack_b_with<T: Bits, R: Round>(
        k: usize,
        n: usize,
        b: &[T],
        b_t: bool,
        cols: Range<usize>,
        depth: Range<usize>,
        out: &mut [u32],
    ) {
        let width = cols.len().div_ceil(32) * 32;
        let pairs = depth.len().div_ceil(32) * 16;
        let out = &mut out[..pairs * width];
        let at = |p: usize, jj: usize| ((jj / 16) * (pairs / 16) + p / 16) * 256 + (p % 16) * 16 + jj % 16;
        let pair = |lo: u16, hi: u16| lo as u32 | (hi as u32) << 16;
        // Only padding is left unwritten below.
        if cols.len() < width || depth.len() < 2 * pairs {
            out.fill(0);
        }
        let f = T::as_f32(b);
        // Whole 16-column x 16-pair tiles of f32 are vectorised; the rest is packed per element.
        let (full_cols, full_pairs) = if f.is_some() { (cols.len() / 16 * 16, depth.len() / 32 * 16) } else { (0, 0) };
        if b_t {
            // `b` is `[n, k]`: each pair is two neighbours in a row of `b`; 16 rows of pairs
            // transposed make a tile.
            if let Some(f) = f {
                // SAFETY: columns jj0..jj0 + 16 <= full_cols of `cols` are rows of `b`, depths
                // 2 p0..2 p0 + 32 <= 2 full_pairs <= depth.len() from depth.start lie in them;
                // each tile row stored is 16 words inside `out`.
                for jj0 in (0..full_cols).step_by(16) {
                    for p0 in (0..full_pairs).step_by(16) {
                        let mut r = [_mm512_setzero_si512(); 16];
                        for (c, w) in r.iter_mut().enumerate() {
                            *w = R::pair_neighbours(f.as_ptr().add((cols.start + jj0 + c) * k + depth.start + 2 * p0));
                        }
                        transpose16(&mut r);
                        for (q, w) in r.iter().enumerate() {
                            _mm512_storeu_si512(out.as_mut_ptr().add(at(p0 + q, jj0)) as *mut __m512i, *w);
                        }
                    }
                }
            }
            for (jj, j) in cols.clone().enumerate() {
                let skip = if jj < full_cols { 2 * full_pairs } else { 0 };
                let row = &b[j * k + depth.start + skip..j * k + depth.end];
                let mut two = row.chunks_exact(2);
                for (p, t) in (&mut two).enumerate() {
                    out[at(skip / 2 + p, jj)] = pair(t[0].bits(), t[1].bits());
                }
                if let [last] = two.remainder() {
                    out[at((skip + row.len()) / 2, jj)] = pair(last.bits(), 0);
                }
            }
            return;
        }
        // `b` is `[k, n]`: row `p` interleaves two rows of `b`, 16 columns (one tile row) at a time.
        for p in 0..depth.len().div_ceil(2) {
            let (l0, l1) = (depth.start + 2 * p, depth.start + 2 * p + 1);
            let r0 = &b[l0 * n + cols.start..l0 * n + cols.end];
            let r1 = (l1 < depth.end).then(|| &b[l1 * n + cols.start..l1 * n + cols.end]);
            let done = match (f, r1.is_some()) {
                (Some(f), true) => {
                    // SAFETY: rows l0 and l1 = l0 + 1 < depth.end <= k, columns t..t + 16 <=
                    // full_cols of `cols`, lie in `b`; 16 words stored inside `out`.
                    for t in (0..full_cols).step_by(16) {
                        let lo = f.as_ptr().add(l0 * n + cols.start + t);
                        _mm512_storeu_si512(
                            out.as_mut_ptr().add(at(p, t)) as *mut __m512i,
                            R::pair_rows(lo, lo.add(n)),
                        );
                    }
                    full_cols
                }
                _ => 0,
            };
            for t in (done..cols.len()).step_by(16) {
                let c0 = &r0[t..(t + 16).min(cols.len())];
                let o = at(p, t);
                let dst = &mut out[o..o + c0.len()];
                match r1 {
                    Some(r1) => {
                        let c1 = &r1[t..t + c0.len()];
                        dst.iter_mut().zip(c0.iter().zip(c1)).for_each(|(d, (x, y))| *d = pair(x.bits(), y.bits()))
                    }
                    None => dst.iter_mut().zip(c0).for_each(|(d, x)| *d = pair(x.bits(), 0)),
                }
            }
        }
    }

    /// `kernel` is AMX or AVX512_BF16, and the CPU has it.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(kernel: Kernel, m: usize, n: usize, k: usize, a: Src, a_t: bool, b: Right, c: &mut [f32], acc: bool) {
        assert!(kernel != Kernel::F32, "the tiled bf16 product needs AMX or AVX512_BF16");
        let ap = PackedA::new(m, k, a, a_t);
        multiply(kernel, m, n, k, ap.tiles(), b, c, acc);
    }

    // Packed operands live in per-thread buffers that are reused: a fresh 50 MB buffer per call
    // (the LM head's backward) cost more in page faults than its products.
    thread_local! {
        static PACKED_A: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
        static PACKED_B: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
        static PACKED_TAIL: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// `op(a)` packed, in a buffer taken from (and given back to, on drop) this thread's.
    pub struct PackedA {
        buf: Vec<u16>,
        start: usize,
        len: usize,
    }

    impl PackedA {
        pub fn new(m: usize, k: usize, a: Src, a_t: bool) -> PackedA {
            let len = m.div_ceil(32) * 32 * k.div_ceil(32) * 32;
            let mut buf = PACKED_A.with(|b| std::mem::take(&mut *b.borrow_mut()));
            let tiles = aligned(&mut buf, len);
            pack_a_tiles(m, k, a, a_t, tiles);
            let start = tiles.as_ptr() as usize - buf.as_ptr() as usize;
            PackedA { buf, start: start / 2, len }
        }

        pub fn tiles(&self) -> &[u16] {
            &self.buf[self.start..self.start + self.len]
        }
    }

    impl Drop for PackedA {
        fn drop(&mut self) {
            let buf = std::mem::take(&mut self.buf);
            PACKED_A.with(|b| {
                let mut b = b.borrow_mut();
                if b.capacity() < buf.capacity() {
                    *b = buf;
                }
            });
        }
    }

    /// `op(a)` (`m x k`) packed into `ap_tiles` (`m_pad x k_pad` values) on the kernel team.
    fn pack_a_tiles(m: usize, k: usize, a: Src, a_t: bool, ap_tiles: &mut [u16]) {
        let (m_pad, k_pad) = (m.div_ceil(32) * 32, k.div_ceil(32) * 32);
        let team = Team::global();
        let pa = SharedMut(ap_tiles.as_mut_ptr());
        team.for_ranges(m_pad, 32, &|rows| {
            let pa = &pa;
            // SAFETY: each range gets the disjoint part of `ap` holding the tiles of its rows
            // (ranges are multiples of 32 rows, tiles 16), which outlives the call; the CPU has
            // AVX-512 (AMX CPUs do).
            unsafe {
                let out = std::slice::from_raw_parts_mut(pa.0.add(rows.start * k_pad), rows.len() * k_pad);
                match a {
                    Src::F32(v) => pack_a(m, k, v, a_t, k_pad, out, rows),
                    Src::Bf16(v) => pack_a(m, k, v, a_t, k_pad, out, rows),
                }
            }
        });
    }

    /// `c (+)= op(a) op(b)` with `op(a)` already packed (`apr`, as [`pack_a_tiles`] lays it out).
    /// `kernel` is AMX or AVX512_BF16, and the CPU has it.
    #[allow(clippy::too_many_arguments)]
    pub fn multiply(kernel: Kernel, m: usize, n: usize, k: usize, apr: &[u16], b: Right, c: &mut [f32], acc: bool) {
        multiply_then(kernel, m, n, k, apr, b, None, c, acc)
    }

    /// A second product `op(a2) op(b2)` (`a2` packed for the same rows, depth `k`) summed into
    /// the first's output blocks after its last depth, before they are stored.
    #[derive(Clone, Copy)]
    pub struct Tail<'a> {
        pub k: usize,
        pub apr: &'a [u16],
        pub b: Src<'a>,
        pub b_t: bool,
    }

    /// A [`Tail`] as one job's block loop sees it: `a2` packed for depth `k_pad`, its `b2` panel
    /// packed for the job's columns, `steps` of 32 depths.
    struct TailBlock<'a> {
        apr: &'a [u16],
        k_pad: usize,
        bp: &'a [u32],
        steps: usize,
    }

    /// [`multiply`], then `tail` summed into the same blocks (its bits: those of a second
    /// [`multiply`] accumulating into `c`, as f32 sums stored and loaded back are exact).
    #[allow(clippy::too_many_arguments)]
    pub fn multiply_then(
        kernel: Kernel,
        m: usize,
        n: usize,
        k: usize,
        apr: &[u16],
        b: Right,
        tail: Option<Tail>,
        c: &mut [f32],
        acc: bool,
    ) {
        assert!(kernel != Kernel::F32, "the tiled bf16 product needs AMX or AVX512_BF16");
        if let Some(t) = &tail {
            let whole = t.apr.len() >= m.div_ceil(32) * 32 * t.k.div_ceil(32) * 32 && t.b.len() >= t.k * n;
            assert!(t.k > 0 && whole, "bf16 multiply: a tail of depth {} with buffers too small", t.k);
        }
        let (m_pad, k_pad) = (m.div_ceil(32) * 32, k.div_ceil(32) * 32);
        assert!(apr.len() >= m_pad * k_pad && c.len() >= m * n, "bf16 multiply: buffers too small");
        let team = Team::global();
        // Jobs are (column panel, row block) pairs: panels alone when there are enough for
        // every thread, else the rows split too (a narrow `b` is packed by each of its jobs).
        let tall = matches!(b, Right::Pack(..)) && tall_product(m, n, k);
        let width = match b {
            _ if tall => n.div_ceil(32) * 32,
            Right::Pack(..) => panel_width(n),
            Right::Packed(p) => p.width,
        };
        let panels = n.div_ceil(width);
        // Jobs are taken in turn (a thread slowed by another tenant of its core does fewer). A
        // prepacked `b` costs nothing to share, so its rows are cut finer (128 per job) for that.
        let min_parts = match b {
            _ if tall => 2 * team.threads(),
            Right::Pack(..) => 1,
            Right::Packed(_) => m_pad / 128,
        };
        let row_parts = team.threads().div_ceil(panels).max(min_parts).min(m_pad / 32).max(1);
        let rows_per = (m_pad / 32).div_ceil(row_parts) * 32;
        let pc = SharedMut(c.as_mut_ptr());
        let per = slice_depth(k);
        let amx = kernel == Kernel::Amx;
        team.for_chunks(panels * row_parts, 1, &|jobs| {
            let pc = &pc;
            let mut bp = PACKED_B.with(|b| std::mem::take(&mut *b.borrow_mut()));
            let bp_tiles = match b {
                Right::Pack(..) => aligned(&mut bp, per / 2 * width),
                Right::Packed(_) => &mut [],
            };
            let mut tbp = PACKED_TAIL.with(|b| std::mem::take(&mut *b.borrow_mut()));
            let tail_tiles = match &tail {
                Some(t) => aligned(&mut tbp, t.k.div_ceil(32) * 16 * width),
                None => &mut [],
            };
            for job in jobs {
                let (panel, part) = (job / row_parts, job % row_parts);
                let cols = panel * width..((panel + 1) * width).min(n);
                let rows = part * rows_per..((part + 1) * rows_per).min(m);
                let tail_block = tail.map(|t| {
                    // SAFETY: AVX-512 as below; the buffer holds the panel's pairs x width words.
                    unsafe {
                        match t.b {
                            Src::F32(v) => pack_b(t.k, n, v, t.b_t, cols.clone(), 0..t.k, tail_tiles),
                            Src::Bf16(v) => pack_b(t.k, n, v, t.b_t, cols.clone(), 0..t.k, tail_tiles),
                        }
                    }
                    TailBlock { apr: t.apr, k_pad: t.k.div_ceil(32) * 32, bp: &*tail_tiles, steps: t.k.div_ceil(32) }
                });
                for (s, d) in (0..k).step_by(per).enumerate() {
                    let depth = d..(d + per).min(k);
                    // SAFETY: AVX-512 as above, and AMX or AVX512_BF16 ([`kernel`] chose this
                    // path); `ap` and the panel are packed and padded as `tiles` and `dots`
                    // require; this job writes only its rows and columns of `c`.
                    unsafe {
                        let panel_b: &[u32] = match b {
                            Right::Pack(Src::F32(v), b_t) => {
                                pack_b(k, n, v, b_t, cols.clone(), depth.clone(), bp_tiles);
                                bp_tiles
                            }
                            Right::Pack(Src::Bf16(v), b_t) => {
                                pack_b(k, n, v, b_t, cols.clone(), depth.clone(), bp_tiles);
                                bp_tiles
                            }
                            Right::Packed(p) => &p.data[p.start + p.offsets[panel * k.div_ceil(per) + s]..],
                        };
                        let acc = acc || d > 0;
                        let tail = if depth.end == k { tail_block.as_ref() } else { None };
                        if amx {
                            tiles(n, k_pad, apr, panel_b, rows.clone(), cols.clone(), depth, tail, pc.0, acc)
                        } else {
                            dots(n, k_pad, apr, panel_b, rows.clone(), cols.clone(), depth, tail, pc.0, acc)
                        }
                    };
                }
            }
            PACKED_B.with(|b| *b.borrow_mut() = bp);
            PACKED_TAIL.with(|b| *b.borrow_mut() = tbp);
        });
    }

    /// The tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    fn config() -> Config {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t] = 64; // colsb[t], little-endian u16
            c[48 + t] = 16; // rows[t]
        }
        Config(c)
    }

    /// Multiplies rows `rows` and depths `depth` of packed `a` by one packed panel of `b`
    /// (those depths) into those rows and the columns `cols` of `c`: 32 x 32 blocks of four
    /// accumulator tiles, two tiles of `a` and two of `b` per 32 depths.
    ///
    /// # Safety
    /// The CPU has AMX-BF16 and the process its tile state ([`amx_available`]); `ap` is laid out
    /// by [`pack_a`] for `k_pad`, `bp` by [`pack_b`] for `cols` and `depth`; `c` is row-major
    /// with `n` columns and only this caller writes its block `rows` x `cols` meanwhile;
    /// `rows.start` and `depth.start` are multiples of 32.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tiles(
        n: usize,
        k_pad: usize,
        ap: &[u16],
        bp: &[u32],
        rows: Range<usize>,
        cols: Range<usize>,
        depth: Range<usize>,
        tail: Option<&TailBlock>,
        c: *mut f32,
        acc: bool,
    ) {
        let steps = depth.len().div_ceil(32);
        let pairs = steps * 16;
        let cfg = config();
        let mut edge = [0f32; 32 * 32];
        // SAFETY: the configuration is valid for palette 1.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        for i in rows.clone().step_by(32) {
            for jj in (0..cols.len()).step_by(32) {
                let j = cols.start + jj;
                let full = i + 32 <= rows.end && j + 32 <= cols.end;
                // Where the 32 x 32 block goes: straight into `c`, or via `edge` at the borders.
                let (dst, sd) = if full { (c.add(i * n + j), n * 4) } else { (edge.as_mut_ptr(), 32 * 4) };
                if !full && acc {
                    for r in 0..32.min(rows.end - i) {
                        for q in 0..32.min(cols.end - j) {
                            edge[r * 32 + q] = *c.add((i + r) * n + j + q);
                        }
                    }
                }
                let a0 = (ap.as_ptr() as *const u8).add(((i / 16) * (k_pad / 32) + depth.start / 32) * TILE);
                let b0 = (bp.as_ptr() as *const u8).add((jj / 16) * (pairs / 16) * TILE);
                // SAFETY (whole block): every tile load reads one packed 1 KB tile inside the
                // packed buffers (padded to whole tiles), every store writes a 16 x 16 block of
                // `dst` inside `c` (a full block) or `edge`.
                std::arch::asm!(
                    "test {acc}, {acc}",
                    "jz 3f",
                    "tileloadd tmm0, [{d} + {sd}*1]",
                    "tileloadd tmm1, [{d1} + {sd}*1]",
                    "tileloadd tmm2, [{d2} + {sd}*1]",
                    "tileloadd tmm3, [{d3} + {sd}*1]",
                    "jmp 5f",
                    "3:",
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    "5:",
                    acc = in(reg) acc as usize,
                    d = in(reg) dst,
                    d1 = in(reg) (dst as *mut u8).add(64),
                    d2 = in(reg) (dst as *mut u8).add(16 * sd),
                    d3 = in(reg) (dst as *mut u8).add(16 * sd + 64),
                    sd = in(reg) sd,
                    options(nostack, readonly),
                );
                // The next block's rows of `c`, fetched for writing while this one multiplies:
                // its stores (and loads, when accumulating) then find them in cache.
                let (ni, nj) = if jj + 32 < cols.len() { (i, j + 32) } else { (i + 32, cols.start) };
                if ni + 32 <= rows.end && nj + 32 <= cols.end {
                    for r in 0..32 {
                        let row = c.add((ni + r) * n + nj) as *const i8;
                        _mm_prefetch::<_MM_HINT_ET0>(row);
                        _mm_prefetch::<_MM_HINT_ET0>(row.add(64));
                    }
                }
                // The accumulators stay in tmm0-3 between these blocks: nothing else in the
                // program uses tile registers.
                tile_steps(a0, a0.add((k_pad / 32) * TILE), b0, b0.add((pairs / 16) * TILE), steps);
                if let Some(t) = tail {
                    let ta = (t.apr.as_ptr() as *const u8).add((i / 16) * (t.k_pad / 32) * TILE);
                    let tb = (t.bp.as_ptr() as *const u8).add((jj / 16) * t.steps * TILE);
                    tile_steps(ta, ta.add((t.k_pad / 32) * TILE), tb, tb.add(t.steps * TILE), t.steps);
                }
                std::arch::asm!(
                    "tilestored [{d} + {sd}*1], tmm0",
                    "tilestored [{d1} + {sd}*1], tmm1",
                    "tilestored [{d2} + {sd}*1], tmm2",
                    "tilestored [{d3} + {sd}*1], tmm3",
                    d = in(reg) dst,
                    d1 = in(reg) (dst as *mut u8).add(64),
                    d2 = in(reg) (dst as *mut u8).add(16 * sd),
                    d3 = in(reg) (dst as *mut u8).add(16 * sd + 64),
                    sd = in(reg) sd,
                    options(nostack),
                );
                if !full {
                    for r in 0..32.min(rows.end - i) {
                        for q in 0..32.min(cols.end - j) {
                            *c.add((i + r) * n + j + q) = edge[r * 32 + q];
                        }
                    }
                }
            }
        }
        // SAFETY: releases the tile state this thread configured.
        std::arch::asm!("tilerelease", options(nostack, nomem));
    }

    /// `steps` times 32 depths into the accumulator tiles tmm0-3 (a 32 x 32 block): the tiles of
    /// rows 0-15 and 16-31 of `a` from `a` and `a2`, of columns 0-15 and 16-31 of the panel from
    /// `b` and `b2`, each one tile (1 KB) further per step.
    ///
    /// # Safety
    /// As [`tiles`], with its tile configuration loaded; each pointer has `steps` packed tiles.
    #[inline(always)]
    unsafe fn tile_steps(a: *const u8, a2: *const u8, b: *const u8, b2: *const u8, steps: usize) {
        std::arch::asm!(
            "7:",
            "tileloadd tmm4, [{a} + {s64}*1]",
            "tileloadd tmm6, [{b} + {s64}*1]",
            "tileloadd tmm7, [{b2} + {s64}*1]",
            "tileloadd tmm5, [{a2} + {s64}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 1024",
            "add {a2}, 1024",
            "add {b}, 1024",
            "add {b2}, 1024",
            "dec {steps}",
            "jnz 7b",
            s64 = in(reg) 64usize,
            a = inout(reg) a => _,
            a2 = inout(reg) a2 => _,
            b = inout(reg) b => _,
            b2 = inout(reg) b2 => _,
            steps = inout(reg) steps => _,
            options(nostack, readonly),
        );
    }

    /// Rows of `a` per block of [`dots`]: eight rows by 32 columns are sixteen accumulator
    /// registers, enough independent sums to cover `vdpbf16ps`'s latency at two per cycle.
    const ROWS: usize = 8;

    /// What [`tiles`] does (the same arguments and packed operands), with AVX512_BF16: 8 x 32
    /// blocks, each pair of depths one broadcast word of `a` per row against two 16-column
    /// words of the panel.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and AVX512_BF16; otherwise as [`tiles`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dots(
        n: usize,
        k_pad: usize,
        ap: &[u16],
        bp: &[u32],
        rows: Range<usize>,
        cols: Range<usize>,
        depth: Range<usize>,
        tail: Option<&TailBlock>,
        c: *mut f32,
        acc: bool,
    ) {
        let steps = depth.len().div_ceil(32);
        let pairs = steps * 16;
        let aw = ap.as_ptr() as *const u32;
        let mut edge = [0f32; ROWS * 32];
        for i in rows.clone().step_by(ROWS) {
            // Rows i..i + 8 lie in one 16-row tile of `a` (i is a multiple of 8): row r's word for
            // pair q of a 16-pair step is at `a0 + r * 16 + q`, and each step is one tile further.
            let a0 = aw.add(((i / 16) * (k_pad / 32) + depth.start / 32) * 256 + (i % 16) * 16);
            for jj in (0..cols.len()).step_by(32) {
                let j = cols.start + jj;
                let (nr, nc) = ((rows.end - i).min(ROWS), (cols.end - j).min(32));
                let full = nr == ROWS && nc == 32;
                let (dst, ld) = if full { (c.add(i * n + j), n) } else { (edge.as_mut_ptr(), 32) };
                if !full && acc {
                    for r in 0..nr {
                        std::ptr::copy_nonoverlapping(c.add((i + r) * n + j), edge.as_mut_ptr().add(r * 32), nc);
                    }
                }
                let mut s = [[_mm512_setzero_ps(); 2]; ROWS];
                if acc {
                    for (r, sr) in s.iter_mut().enumerate() {
                        sr[0] = _mm512_loadu_ps(dst.add(r * ld));
                        sr[1] = _mm512_loadu_ps(dst.add(r * ld + 16));
                    }
                }
                // The panel's two 16-column words of pair p are at `b0 + p * 16` and `b1 + p * 16`.
                let b0 = bp.as_ptr().add((jj / 16) * pairs * 16);
                let b1 = b0.add(pairs * 16);
                dot_steps(&mut s, a0, b0, b1, steps);
                if let Some(t) = tail {
                    let ta = (t.apr.as_ptr() as *const u32).add((i / 16) * (t.k_pad / 32) * 256 + (i % 16) * 16);
                    let tb0 = t.bp.as_ptr().add((jj / 16) * t.steps * 256);
                    dot_steps(&mut s, ta, tb0, tb0.add(t.steps * 256), t.steps);
                }
                for (r, sr) in s.iter().enumerate() {
                    _mm512_storeu_ps(dst.add(r * ld), sr[0]);
                    _mm512_storeu_ps(dst.add(r * ld + 16), sr[1]);
                }
                if !full {
                    for r in 0..nr {
                        std::ptr::copy_nonoverlapping(edge.as_ptr().add(r * 32), c.add((i + r) * n + j), nc);
                    }
                }
            }
        }
    }

    /// `steps` times 32 depths of an 8 x 32 block of [`dots`]: `a0` is row `i`'s word for the
    /// first pair, `b0`/`b1` the panel's two 16-column words of the first pair.
    ///
    /// # Safety
    /// As [`dots`]; the pointers lie in packed operands holding `steps` tiles from them.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dot_steps(s: &mut [[__m512; 2]; ROWS], a0: *const u32, b0: *const u32, b1: *const u32, steps: usize) {
        for t in 0..steps {
            let at = a0.add(t * 256);
            for q in 0..16 {
                let p = t * 16 + q;
                let x0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0.add(p * 16) as *const __m512i));
                let x1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(p * 16) as *const __m512i));
                for (r, sr) in s.iter_mut().enumerate() {
                    let w: __m512bh = std::mem::transmute(_mm512_set1_epi32(*at.add(r * 16 + q) as i32));
                    sr[0] = _mm512_dpbf16_ps(sr[0], w, x0);
                    sr[1] = _mm512_dpbf16_ps(sr[1], w, x1);
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// f32 values with every rounding case: ties (odd and even), NaNs, infinities, denormals,
        /// signed zeros and ordinary values.
        fn awkward(len: usize, seed: u32) -> Vec<f32> {
            let special = [
                1.0 + 1.0 / 256.0,
                1.0 + 3.0 / 256.0,
                -(1.0 + 1.0 / 256.0),
                f32::NAN,
                -f32::NAN,
                f32::from_bits(0x7f80_0001),
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::from_bits(1),
                f32::from_bits(0x8000_8000),
                f32::from_bits(0x0040_0000),
                f32::from_bits(0x8012_3456),
                0.0,
                -0.0,
                f32::MAX,
            ];
            (0..len)
                .map(|i| {
                    let h = (i as u32).wrapping_mul(2654435761) ^ seed;
                    if h.is_multiple_of(7) {
                        special[(h as usize / 7) % special.len()]
                    } else {
                        ((h % 20011) as f32 / 977.0 - 10.0) * 1.0001
                    }
                })
                .collect()
        }

        /// `x` rounded as Intel documents `vcvtne2ps2bf16`: an f32 denormal flushed to a zero of
        /// its sign.
        fn hw_bits(x: f32) -> u16 {
            if x.is_subnormal() {
                (x.to_bits() >> 16) as u16 & 0x8000
            } else {
                to_bf16_bits(x)
            }
        }

        /// The 16-bit halves of packed words.
        fn halves(v: &[u32]) -> Vec<u32> {
            v.iter().flat_map(|&w| [w & 0xffff, w >> 16]).collect()
        }

        /// The first place where `got` is neither `soft` nor `flushed`, with the three values.
        fn either<W: Copy + PartialEq>(got: &[W], soft: &[W], flushed: &[W]) -> Option<(usize, W, W, W)> {
            let i = (0..got.len()).find(|&i| got[i] != soft[i] && got[i] != flushed[i])?;
            Some((i, got[i], soft[i], flushed[i]))
        }

        #[test]
        fn vectorised_packing_gives_the_bits_of_element_wise_packing() {
            if !(std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw")) {
                eprintln!("skipped: no AVX-512 here");
                return;
            }
            let hw = avx512_bf16_available();
            if !hw {
                eprintln!("AVX512_BF16 rounding not checked: not here (or MEET_SIMD caps it)");
            }
            // f32 sources take the vectorised paths (each rounding), their bf16 bits the
            // element-wise ones: [`Soft`] gives `to_bf16_bits`; [`Hw`] the same, but where the
            // CPU flushes denormals (as Intel documents `vcvtne2ps2bf16`; this Xeon does not)
            // a denormal may be a zero of its sign.
            for (rows, cols, depth) in [(16, 16, 32), (50, 70, 100), (33, 256, 768), (64, 17, 31), (7, 48, 64)] {
                for t in [false, true] {
                    let (m, k) = (rows, depth);
                    let a = awkward(m * k, 1);
                    let a_bits: Vec<u16> = a.iter().map(|&x| to_bf16_bits(x)).collect();
                    let a_hw: Vec<u16> = a.iter().map(|&x| hw_bits(x)).collect();
                    assert!(a_bits != a_hw, "the values include denormals");
                    let k_pad = k.div_ceil(32) * 32;
                    let m_pad = m.div_ceil(32) * 32;
                    let fresh = |v: u16| vec![v; m_pad * k_pad];
                    let (mut x, mut y, mut xh, mut yh) = (fresh(1), fresh(2), fresh(5), fresh(6));
                    // SAFETY: AVX-512 F/BW checked above, AVX512_BF16 for the `hw` calls;
                    // buffers sized for all tiles of the rows.
                    unsafe {
                        pack_a_soft(m, k, &a, t, k_pad, &mut x, 0..m_pad);
                        pack_a(m, k, &a_bits, t, k_pad, &mut y, 0..m_pad);
                        if hw {
                            pack_a_hw(m, k, &a, t, k_pad, &mut xh, 0..m_pad);
                            pack_a(m, k, &a_hw, t, k_pad, &mut yh, 0..m_pad);
                        }
                    }
                    assert_eq!(x, y, "pack_a {rows}x{depth} transposed {t}");
                    if hw {
                        let bad = either(&xh, &y, &yh);
                        assert!(bad.is_none(), "pack_a (AVX512_BF16) {rows}x{depth} transposed {t}: {bad:x?}");
                    }
                    let n = cols + 5;
                    let b = awkward(k * n, 2);
                    let b_bits: Vec<u16> = b.iter().map(|&x| to_bf16_bits(x)).collect();
                    let b_hw: Vec<u16> = b.iter().map(|&x| hw_bits(x)).collect();
                    for (c0, d0) in [(0, 0), (5, 32)] {
                        let (cr, dr) = (c0..cols.min(n - c0) + c0, d0.min(k)..k);
                        let len = dr.len().div_ceil(32) * 16 * cr.len().div_ceil(32) * 32;
                        let fresh = |v: u32| vec![v; len];
                        let (mut x, mut y, mut xh, mut yh) = (fresh(3), fresh(4), fresh(7), fresh(8));
                        // SAFETY: as above.
                        unsafe {
                            pack_b_soft(k, n, &b, t, cr.clone(), dr.clone(), &mut x);
                            pack_b(k, n, &b_bits, t, cr.clone(), dr.clone(), &mut y);
                            if hw {
                                pack_b_hw(k, n, &b, t, cr.clone(), dr.clone(), &mut xh);
                                pack_b(k, n, &b_hw, t, cr.clone(), dr.clone(), &mut yh);
                            }
                        }
                        assert_eq!(x, y, "pack_b {depth}x{cols} from ({c0}, {d0}) transposed {t}");
                        if hw {
                            let bad = either(&halves(&xh), &halves(&y), &halves(&yh));
                            assert!(bad.is_none(), "pack_b (AVX512_BF16) {depth}x{cols} from ({c0}, {d0}): {bad:x?}");
                        }
                    }
                }
            }
        }

        #[test]
        fn the_tiled_kernels_multiply_bf16_denormals_as_zeros() {
            // Why the two roundings give the same products: operands with bf16 denormals give the
            // bits of the same operands with those flushed to signed zeros, on each kernel.
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let mut kernels = Vec::new();
            if avx512_bf16_available() {
                kernels.push(Kernel::Avx512Bf16);
            }
            if amx_available() {
                kernels.push(Kernel::Amx);
            }
            if kernels.is_empty() {
                eprintln!("skipped: no bf16 kernel here");
            }
            let (m, n, k) = (40, 70, 96);
            // Every third row of `a` all bf16 denormals of either sign, the other rows ordinary;
            // `b` near 2^100, so that the denormal rows' sums are far from zero unless the
            // kernel takes them as zeros.
            let a: Vec<u16> = (0..m * k)
                .map(|i| {
                    if (i / k) % 3 == 0 {
                        let sign = if i & 8 == 0 { 0 } else { 0x8000 };
                        sign | (((i as u32 * 7919) % 0x7f) | 1) as u16
                    } else {
                        to_bf16_bits((i as f32 * 0.37).sin())
                    }
                })
                .collect();
            let b: Vec<u16> = (0..k * n).map(|i| to_bf16_bits((i as f32 * 0.11).cos() * 2f32.powi(100))).collect();
            let a0: Vec<u16> = a.iter().map(|&w| if w & 0x7f80 == 0 { w & 0x8000 } else { w }).collect();
            assert!(a0 != a, "the left operand holds denormals");
            // What the sums would be with the denormals counted: far from zero.
            let widened = |v: &[u16]| v.iter().map(|&w| f32::from_bits((w as u32) << 16)).collect::<Vec<_>>();
            let mut counted = vec![0f32; m * n];
            sgemm(m, n, k, &widened(&a), false, &widened(&b), false, &mut counted, false);
            assert!(counted[..n].iter().all(|c| c.abs() > 1e-12), "the denormal rows count in f32");
            for kr in kernels {
                for b_t in [false, true] {
                    let b_op: Vec<u16> =
                        if b_t { (0..k * n).map(|i| b[(i % k) * n + i / k]).collect() } else { b.clone() };
                    let (mut want, mut got) = (vec![0f32; m * n], vec![0f32; m * n]);
                    gemm_on(kr, m, n, k, Src::Bf16(&a0), false, Src::Bf16(&b_op), b_t, &mut want, false);
                    gemm_on(kr, m, n, k, Src::Bf16(&a), false, Src::Bf16(&b_op), b_t, &mut got, false);
                    assert_eq!(bits(&want), bits(&got), "{kr:?} b_t {b_t}");
                    assert!(got[..n].iter().all(|&c| c == 0.0), "{kr:?}: denormal rows sum to zero");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        for x in [0.1f32, -3.3, 1e-30, 6.5e4] {
            assert_eq!(to_bf16_bits(x), half::bf16::from_f32(x).to_bits(), "{x}");
        }
    }

    #[test]
    fn ties_are_counted_and_a_tiny_update_moves_a_tie_half_a_step() {
        let tie = 1.0 + 1.0 / 256.0;
        assert_eq!(tie_share(&[tie, 1.0 + 2.0 / 256.0, -tie, 0.3]), 0.5);
        assert_eq!(tie_share(&[]), 0.0);
        // A tie rounds down to the even neighbour; an update of 1e-7 flips it to the odd one above:
        // a change of 2^-8 from an update 40000x smaller.
        assert_eq!(round_bf16(tie), 1.0);
        assert_eq!(round_bf16(tie + 1e-7), 1.0 + 2.0 / 256.0);
        // Weights of a block-quantized layout (an f16 scale x a 4-bit integer + an f16 offset):
        // a large share are ties, while spread-out f32 values have almost none.
        let (d, m) = (half::f16::from_f32(0.0123).to_f32(), half::f16::from_f32(-0.0917).to_f32());
        let quantized: Vec<f32> = (0..16).map(|q| d * q as f32 + m).collect();
        assert!(tie_share(&quantized) > 0.05, "{}", tie_share(&quantized));
        let spread: Vec<f32> = (0..100_000).map(|i| ((i as f32) * 0.618_034).sin() * 0.05).collect();
        assert!(tie_share(&spread) < 1e-3, "{}", tie_share(&spread));
    }

    /// The product of the bf16-rounded operands, summed in f64.
    fn reference(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        (0..m * n)
            .map(|i| (0..k).map(|l| round_bf16(a[(i / n) * k + l]) as f64 * round_bf16(b[l * n + i % n]) as f64).sum())
            .collect()
    }

    fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols).map(|i| v[(i % rows) * cols + i / rows]).collect()
    }

    #[test]
    fn a_packed_left_operand_gives_the_bits_of_packing_it_per_product() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // Above and below the tiled path's size threshold, both layouts of each operand.
        for (m, n, k) in [(512, 64, 576), (70, 300, 65), (3, 5, 7), (40, 70, 1600)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
            let c0: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.07).sin()).collect();
            for (a_t, b_t, acc) in [(false, true, false), (true, false, true), (false, false, true)] {
                let pa = PackedA::new(m, k, Src::F32(&a), a_t);
                let (mut want, mut got) = (c0.clone(), c0.clone());
                gemm(m, n, k, Src::F32(&a), a_t, Src::F32(&b), b_t, &mut want, acc);
                pa.gemm(n, Src::F32(&b), b_t, &mut got, acc);
                assert_eq!(bits(&want), bits(&got), "{m}x{n}x{k} a_t {a_t} b_t {b_t} accumulate {acc}");
                if let Some(pb) = PackedB::new(k, n, Src::F32(&b), b_t) {
                    let (mut want, mut got) = (c0.clone(), c0.clone());
                    pb.gemm(m, Src::F32(&a), a_t, &mut want, acc);
                    pa.gemm_packed(&pb, &mut got, acc);
                    assert_eq!(bits(&want), bits(&got), "packed b: {m}x{n}x{k} a_t {a_t} b_t {b_t} accumulate {acc}");
                }
            }
        }
    }

    #[test]
    fn a_tail_product_gives_the_bits_of_accumulating_it_after_the_first() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        #[cfg(target_arch = "x86_64")]
        {
            let mut kernels = Vec::new();
            if tiled::avx512_bf16_available() {
                kernels.push(Kernel::Avx512Bf16);
            }
            if tiled::amx_available() {
                kernels.push(Kernel::Amx);
            }
            // Whole and partial blocks, depths cut into slices (1600), tails shorter than a step.
            for (m, n, k, k2) in [(512, 576, 576, 64), (70, 300, 65, 40), (40, 70, 1600, 64), (33, 47, 70, 96)] {
                let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
                let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
                let a2: Vec<f32> = (0..m * k2).map(|i| (i as f32 * 0.23).cos() * 0.5).collect();
                let b2: Vec<f32> = (0..k2 * n).map(|i| (i as f32 * 0.05).sin()).collect();
                let c0: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.07).sin()).collect();
                for &kr in &kernels {
                    let (pa, pa2) = (
                        tiled::PackedA::new(m, k, Src::F32(&a), false),
                        tiled::PackedA::new(m, k2, Src::F32(&a2), true),
                    );
                    let pb = tiled::Packed::new(k, n, Src::F32(&b), true);
                    for (b2_t, acc) in [(false, false), (true, true)] {
                        let (mut want, mut got) = (c0.clone(), c0.clone());
                        tiled::multiply(kr, m, n, k, pa.tiles(), tiled::Right::Packed(&pb), &mut want, acc);
                        tiled::multiply(
                            kr,
                            m,
                            n,
                            k2,
                            pa2.tiles(),
                            tiled::Right::Pack(Src::F32(&b2), b2_t),
                            &mut want,
                            true,
                        );
                        let tail = tiled::Tail { k: k2, apr: pa2.tiles(), b: Src::F32(&b2), b_t: b2_t };
                        tiled::multiply_then(
                            kr,
                            m,
                            n,
                            k,
                            pa.tiles(),
                            tiled::Right::Packed(&pb),
                            Some(tail),
                            &mut got,
                            acc,
                        );
                        assert_eq!(bits(&want), bits(&got), "{kr:?} {m}x{n}x{k} then {k2}, accumulate {acc}");
                    }
                }
            }
        }
        // The public entry (whichever kernel this process uses) against its two-product meaning.
        let (m, n, k, k2) = (128, 200, 96, 64);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let a2: Vec<f32> = (0..m * k2).map(|i| (i as f32 * 0.23).cos()).collect();
        let b2: Vec<f32> = (0..k2 * n).map(|i| (i as f32 * 0.05).sin()).collect();
        let (pa, pa2) = (PackedA::new(m, k, Src::F32(&a), false), PackedA::new(m, k2, Src::F32(&a2), false));
        if let Some(pb) = PackedB::new(k, n, Src::F32(&b), true) {
            let (mut want, mut got) = (vec![0.25f32; m * n], vec![0.25f32; m * n]);
            pa.gemm_packed(&pb, &mut want, true);
            pa2.gemm(n, Src::F32(&b2), false, &mut want, true);
            pa.gemm_packed_then(&pb, &pa2, Src::F32(&b2), false, &mut got, true);
            assert_eq!(bits(&want), bits(&got));
        }
    }

    #[test]
    fn a_tall_product_gives_the_bits_of_its_row_blocks() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if tiled::avx512_bf16_available() {
                kernels.push(Kernel::Avx512Bf16);
            }
            if tiled::amx_available() {
                kernels.push(Kernel::Amx);
            }
        }
        if kernels.is_empty() {
            eprintln!("skipped: this CPU has no tiled bf16 kernel");
        }
        // Tall (rows split over the jobs, one panel of every column) against blocks of 200 rows,
        // each product short enough for the column panels; whole and partial 32 x 32 blocks.
        for (m, n, k) in [(1600, 96, 100), (2100, 130, 512), (4800, 300, 64)] {
            assert!(tiled::tall_product(m, n, k) && !tiled::tall_product(200, n, k));
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
            let c0: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.07).sin()).collect();
            for &kr in &kernels {
                for (a_t, b_t, acc) in [(false, false, false), (true, false, true), (true, true, false)] {
                    let mut whole = c0.clone();
                    gemm_on(kr, m, n, k, Src::F32(&a), a_t, Src::F32(&b), b_t, &mut whole, acc);
                    let mut blocks = c0.clone();
                    for r0 in (0..m).step_by(200) {
                        let rows = (m - r0).min(200);
                        // Rows r0.. of op(a), in the same layout as `a`.
                        let part: Vec<f32> = if a_t {
                            (0..k).flat_map(|l| a[l * m + r0..l * m + r0 + rows].to_vec()).collect()
                        } else {
                            a[r0 * k..(r0 + rows) * k].to_vec()
                        };
                        let c = &mut blocks[r0 * n..(r0 + rows) * n];
                        gemm_on(kr, rows, n, k, Src::F32(&part), a_t, Src::F32(&b), b_t, c, acc);
                    }
                    assert_eq!(bits(&whole), bits(&blocks), "{kr:?} {m}x{n}x{k} a_t {a_t} b_t {b_t} accumulate {acc}");
                }
            }
        }
    }

    #[test]
    fn products_match_rounded_operands_in_every_layout_and_size() {
        // Every kernel this CPU has, not only the one `kernel` picks.
        let mut kernels = vec![Kernel::F32];
        #[cfg(target_arch = "x86_64")]
        {
            if tiled::avx512_bf16_available() {
                kernels.push(Kernel::Avx512Bf16);
            }
            if tiled::amx_available() {
                kernels.push(Kernel::Amx);
            }
        }
        eprintln!("bf16 kernels tested: {kernels:?} (used: {:?})", kernel());
        // Sizes around the 32 x 32 blocks, 256-column panels and depth slices, and under the AMX
        // threshold.
        for (m, n, k) in
            [(3, 5, 7), (32, 32, 32), (33, 47, 70), (70, 300, 65), (128, 520, 96), (5, 600, 40), (40, 70, 1600)]
        {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want = reference(m, n, k, &a, &b);
            let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
            for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
                let av = if a_t { &at } else { &a };
                let bv = if b_t { &bt } else { &b };
                let close = |c: &[f32], shift: f64| {
                    c.iter().zip(&want).all(|(x, y)| (*x as f64 - y - shift).abs() <= 1e-5 * (1.0 + y.abs()))
                };
                let mut c = vec![0.5f32; m * n];
                let bits: Vec<u16> = bv.iter().map(|&x| to_bf16_bits(x)).collect();
                for &kr in &kernels {
                    c.fill(0.5);
                    gemm_on(kr, m, n, k, Src::F32(av), a_t, Src::F32(bv), b_t, &mut c, false);
                    assert!(close(&c, 0.0), "{kr:?} {m}x{n}x{k} a_t {a_t} b_t {b_t}");
                    c.fill(0.5);
                    gemm_on(kr, m, n, k, Src::F32(av), a_t, Src::Bf16(&bits), b_t, &mut c, true);
                    assert!(close(&c, 0.5), "{kr:?} accumulate, bf16 b: {m}x{n}x{k} a_t {a_t} b_t {b_t}");
                }
                if let Some(p) = PackedB::new(k, n, Src::F32(bv), b_t) {
                    p.gemm(m, Src::F32(av), a_t, &mut c, false);
                    assert!(close(&c, 0.0), "packed b: {m}x{n}x{k} a_t {a_t} b_t {b_t}");
                }
            }
        }
    }
}
