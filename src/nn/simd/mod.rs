//! Vectorised elementwise math for the CPU kernels.

/// `x[i] = exp(x[i] - shift)` in place; returns the sum of the results.
///
/// AVX2: Cody-Waite range reduction and a degree-6 polynomial (Cephes `expf`), within 2 ulp of
/// libm over the range used here (softmax arguments are <= 0); inputs below -87.3 give exactly 0,
/// as `expf` underflows there.
pub fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // Safety: the features were detected.
        return unsafe { x86::exp_shifted_sum(x, shift) };
    }
    exp_shifted_sum_scalar(x, shift)
}

/// The plain-Rust [`exp_shifted_sum`], summed in f64: one f32 running sum over a 49k-entry
/// vocabulary rounds each of its many tiny terms against a sum near 1 and biased log-probs by
/// ~1e-4 per token (the vector paths keep 8 or 16 partial sums, which is why they did not).
fn exp_shifted_sum_scalar(x: &mut [f32], shift: f32) -> f32 {
    let mut sum = 0f64;
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
        sum += *v as f64;
    }
    sum as f32
}

/// [`exp_shifted_sum`] with the widest vectors the CPU has (AVX-512 when present: twice the
/// exponentials per instruction), summing in its own order: for softmax rows whose sum need not
/// match [`log_sum_exp`] bit for bit (attention).
pub fn exp_shifted_sum_wide(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // Safety: the features were detected.
        return unsafe { x86::exp_shifted_sum_512(x, shift) };
    }
    exp_shifted_sum(x, shift)
}

/// Whether the CPU has AVX-512 F (with AVX2 and FMA, which the kernels here also use) and the
/// environment allows it: `MEET_SIMD=avx2` keeps `meet`'s own kernels on their AVX2 paths, so a
/// machine with AVX-512 also tests the fallback (`scripts/test.sh` does). The `gemm` crate's
/// products choose their kernels themselves.
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| has_avx2() && std::arch::is_x86_feature_detected!("avx512f") && simd_allows("avx512"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The widest of `meet`'s own vector kernels this process uses: `avx512`, `avx2` or `scalar`
/// (bf16 products: [`crate::nn::bf16::kernel`]).
pub fn kernel_level() -> &'static str {
    if has_avx512() {
        "avx512"
    } else if has_avx2() {
        "avx2"
    } else {
        "scalar"
    }
}

/// The largest value of a non-empty row (`-inf` for an empty one). Sixteen running maxima, so
/// the compiler keeps them in vector registers (a plain `fold(f32::max)` stays scalar).
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    acc.iter().fold(tail, |m, &v| if v > m { v } else { m })
}

/// `log Σ exp(x[i])` of a row, which stays as it is (no scratch copy): the log-probability
/// normaliser of a row of logits. Sums in the same order as [`exp_shifted_sum`].
pub fn log_sum_exp(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // Safety: the features were detected.
        return unsafe { x86::log_sum_exp(x) };
    }
    log_sum_exp_scalar(x)
}

/// The plain-Rust [`log_sum_exp`], summed in f64 as [`exp_shifted_sum_scalar`].
fn log_sum_exp_scalar(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + (x.iter().map(|v| (v - max).exp() as f64).sum::<f64>().ln() as f32)
}

/// Whether the CPU has AVX2, FMA and F16C (every x86 core since Haswell / Zen), which all the
/// vector kernels here and in `packed` are compiled for.
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
                && simd_allows("avx2")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether `MEET_SIMD` (unset, `amx`, `avx512`, `avx2` or `scalar`: the widest kernels `meet`
/// may use) allows the `level` kernels. Read once; any other value is one warning and allows
/// everything, so a typo never silently slows a run down.
#[cfg(target_arch = "x86_64")]
pub(crate) fn simd_allows(level: &str) -> bool {
    const LEVELS: [&str; 4] = ["scalar", "avx2", "avx512", "amx"];
    static CAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cap = *CAP.get_or_init(|| {
        let Ok(v) = std::env::var("MEET_SIMD") else { return LEVELS.len() - 1 };
        LEVELS.iter().position(|x| *x == v.trim()).unwrap_or_else(|| {
            tracing::warn!("MEET_SIMD={v:?} is not one of scalar, avx2, avx512, amx; ignored");
            LEVELS.len() - 1
        })
    });
    LEVELS.iter().position(|x| *x == level).is_some_and(|r| r <= cap)
}

/// `sum(a[i] * b[i])` over equal-length slices.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // Safety: the features were detected.
        return unsafe { x86::dot(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `out[r * ldo + j] = dot(a[r], b[j])` for `r < na`, `j < nb`: every row of one strided matrix
/// against every row of another (`len` values each; row `r` of `a` starts at `a[r * sa]`, row `j`
/// of `b` at `b[j * sb]`). Attention's scores of a few query rows against the keys of a cache,
/// and the packed product's rows of x against expanded rows of w.
///
/// Four rows of b at a time against three rows of a keep 12 accumulators in registers, load each
/// vector once for 3 or 4 products, and reduce a row's four sums together (three `hadd`s), where
/// one [`dot`] per pair reduces each sum alone.
#[allow(clippy::too_many_arguments)]
pub fn dot_block(
    a: &[f32],
    sa: usize,
    na: usize,
    b: &[f32],
    sb: usize,
    nb: usize,
    len: usize,
    out: &mut [f32],
    ldo: usize,
) {
    if na == 0 || nb == 0 {
        return;
    }
    assert!(
        a.len() >= (na - 1) * sa + len && b.len() >= (nb - 1) * sb + len && out.len() >= (na - 1) * ldo + nb,
        "dot_block: operands too short"
    );
    // Safety: the bounds are checked above.
    unsafe { dot_block_raw(a.as_ptr(), sa, na, b.as_ptr(), sb, nb, len, out.as_mut_ptr(), ldo) }
}

/// [`dot_block`] on raw pointers, for outputs that threads write in disjoint column ranges.
///
/// Safety: `a`, `b` must be readable and `out` writable at every offset [`dot_block`] checks.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn dot_block_raw(
    a: *const f32,
    sa: usize,
    na: usize,
    b: *const f32,
    sb: usize,
    nb: usize,
    len: usize,
    out: *mut f32,
    ldo: usize,
) {
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && len.is_multiple_of(8) {
        while j + 4 <= nb {
            x86::dot_block4(a, sa, na, b.add(j * sb), sb, len, out.add(j), ldo);
            j += 4;
        }
    }
    for jj in j..nb {
        let bj = std::slice::from_raw_parts(b.add(jj * sb), len);
        for r in 0..na {
            *out.add(r * ldo + jj) = dot(std::slice::from_raw_parts(a.add(r * sa), len), bj);
        }
    }
}

/// Test check shared by the product kernels: `out[r * ldo + j]` equals `dot(a[r], b[j])` summed
/// in f64 (rows strided as in [`dot_block`]) within 1e-4.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn assert_row_dots(
    a: &[f32],
    sa: usize,
    na: usize,
    b: &[f32],
    sb: usize,
    nb: usize,
    len: usize,
    out: &[f32],
    ldo: usize,
    what: &str,
) {
    for r in 0..na {
        for j in 0..nb {
            let want: f64 = (0..len).map(|i| a[r * sa + i] as f64 * b[j * sb + i] as f64).sum();
            let got = out[r * ldo + j] as f64;
            assert!((got - want).abs() < 1e-4, "{what} ({r},{j}): {got} vs {want}");
        }
    }
}

/// `y[i] += alpha * x[i]`.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // Safety: the features were detected.
        return unsafe { x86::axpy(alpha, x, y) };
    }
    y.iter_mut().zip(x).for_each(|(yi, xi)| *yi += alpha * xi);
}

/// `out = Σ_j p[j] · src[j * stride ..][.. out.len()]`, rows with weight 0 skipped: attention's
/// probability-weighted sum of value rows (a strided view of one kv head of a cache). Each 64-column
/// stripe of `out` stays in registers over all rows instead of being loaded and stored per row;
/// the sums are those of [`axpy`] row by row, in the same order.
pub fn weighted_rows(p: &[f32], src: &[f32], stride: usize, out: &mut [f32]) {
    let d = out.len();
    if p.is_empty() {
        out.fill(0.0);
        return;
    }
    assert!(src.len() >= (p.len() - 1) * stride + d, "weighted_rows: source too short");
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // Safety: the features were detected; every row read is inside `src` (checked above).
        return unsafe { x86::weighted_rows(p, src, stride, out) };
    }
    out.fill(0.0);
    for (j, &w) in p.iter().enumerate() {
        if w != 0.0 {
            axpy(w, &src[j * stride..][..d], out);
        }
    }
}

/// `out[i] = silu(g[i]) * u[i]` with `silu(x) = x / (1 + exp(-x))` (the SwiGLU gate).
pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    debug_assert!(g.len() == u.len() && u.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // Safety: the features were detected (every AVX-512 CPU `meet` uses has AVX2 and FMA:
        // `has_avx512` requires `has_avx2`).
        return unsafe { x86::silu_mul_512(g, u, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // Safety: the features were detected.
        return unsafe { x86::silu_mul(g, u, out) };
    }
    for ((o, &a), &b) in out.iter_mut().zip(g).zip(u) {
        *o = a / (1.0 + (-a).exp()) * b;
    }
}

/// SwiGLU's gradients: with `s = sigmoid(g)`, `dg = dy u s (1 + g (1 - s))`, `du = dy g s`.
pub fn silu_mul_grads(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    debug_assert!(g.len() == u.len() && u.len() == dy.len() && dy.len() == dg.len() && dg.len() == du.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // Safety: as in `silu_mul`.
        return unsafe { x86::silu_mul_grads_512(g, u, dy, dg, du) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // Safety: the features were detected.
        return unsafe { x86::silu_mul_grads(g, u, dy, dg, du) };
    }
    for i in 0..g.len() {
        let s = 1.0 / (1.0 + (-g[i]).exp());
        dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        du[i] = dy[i] * g[i] * s;
    }
}

/// `out[c] = Σ x²` in f64 over chunk `c` of `chunk` values of `v` (the last may be shorter), each
/// chunk summed in order from its first value: the gradient norm's partial sums. With AVX-512,
/// sixteen chunks go through one vector, one chunk per lane, so each lane keeps its chunk's order
/// (and `x²` is exact in f64, so the fused multiply-add rounds as the add alone): the same bits,
/// without one chunk's chain of dependent adds (4 cycles each) bounding the speed.
pub fn chunk_square_sums(v: &[f32], chunk: usize, out: &mut [f64]) {
    assert!(
        chunk > 0 && out.len() == v.len().div_ceil(chunk),
        "chunk_square_sums: {} sums for {} values",
        out.len(),
        v.len()
    );
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx512() && chunk < 1 << 26 {
        // Safety: the feature was detected; the kernel reads only whole chunks inside `v` and
        // writes one sum per chunk it reads.
        done = unsafe { x86::chunk_square_sums_512(v, chunk, out) };
    }
    for (c, o) in out.iter_mut().enumerate().skip(done) {
        *o = v[c * chunk..((c + 1) * chunk).min(v.len())].iter().map(|&x| (x as f64) * (x as f64)).sum();
    }
}

/// Constants of one AdamW step (torch's `AdamW` with `foreach=False`; see [`adamw`]).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// `1 - lr * weight_decay`.
    pub keep: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f32,
    /// The clipping factor applied to the gradient.
    pub grad_scale: f32,
}

/// One AdamW step in place, element by element as torch does it: `p *= 1 - lr wd`, `m` moves
/// toward `g` by `1 - beta1`, `v = beta2 v + (1 - beta2) g²`, `p -= step_size m / (sqrt(v) /
/// sqrt(bc2) + eps)`. The AVX-512 copy is the same code compiled for wider vectors (Rust never
/// fuses a multiply and an add on its own), so every path gives the same bits.
pub fn adamw(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: AdamWStep) {
    assert!(p.len() == m.len() && m.len() == v.len() && v.len() == g.len(), "adamw: sizes differ");
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // Safety: the feature was detected.
        return unsafe { x86::adamw_512(p, m, v, g, k) };
    }
    adamw_body(p, m, v, g, k)
}

#[inline(always)]
pub(super) fn adamw_body(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: AdamWStep) {
    for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        let gi = g * k.grad_scale;
        *p *= k.keep;
        *m += (gi - *m) * (1.0 - k.beta1);
        *v = k.beta2 * *v + (1.0 - k.beta2) * gi * gi;
        *p -= k.step_size * *m / (v.sqrt() / k.bc2_sqrt + k.eps);
    }
}

/// √(2/π), GELU-new's slope inside the tanh.
const GELU_K: f32 = 0.797_884_6;
/// GELU-new's cubic coefficient.
const GELU_C: f32 = 0.044_715;

/// GPT-2's GELU (`gelu_new`): `out = 0.5 x (1 + tanh(k (x + c x³)))`.
pub fn gelu_new(x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // Safety: the features were detected.
        return unsafe { x86::gelu_new_512(x, out) };
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = 0.5 * v * (1.0 + (GELU_K * (v + GELU_C * v * v * v)).tanh());
    }
}

/// GELU-new's input gradient: with `t = tanh(k (x + c x³))`,
/// `dx = dy (0.5 (1 + t) + 0.5 x (1 − t²) k (1 + 3 c x²))`.
pub fn gelu_new_grad(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    debug_assert!(x.len() == dy.len() && dy.len() == dx.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // Safety: the features were detected.
        return unsafe { x86::gelu_new_grad_512(x, dy, dx) };
    }
    for i in 0..x.len() {
        let v = x[i];
        let t = (GELU_K * (v + GELU_C * v * v * v)).tanh();
        dx[i] = dy[i] * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * v * v));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx512_swiglu_kernels_give_the_avx2_bits() {
        if !(has_avx512() && has_avx2()) {
            eprintln!("skipped: no AVX-512 here (or MEET_SIMD caps it)");
            return;
        }
        for n in [0, 7, 8, 15, 16, 17, 31, 40, 1000, 1003] {
            let g: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.731).sin() * 12.0).collect();
            let u: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.3).cos()).collect();
            let dy: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.17).sin()).collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            // SAFETY: the features were checked above.
            unsafe {
                x86::silu_mul_512(&g, &u, &mut a);
                x86::silu_mul(&g, &u, &mut b);
            }
            assert_eq!(bits(&a), bits(&b), "silu_mul, {n} values");
            let (mut dg1, mut du1, mut dg2, mut du2) = (vec![0f32; n], vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            // SAFETY: as above.
            unsafe {
                x86::silu_mul_grads_512(&g, &u, &dy, &mut dg1, &mut du1);
                x86::silu_mul_grads(&g, &u, &dy, &mut dg2, &mut du2);
            }
            assert_eq!((bits(&dg1), bits(&du1)), (bits(&dg2), bits(&du2)), "silu_mul_grads, {n} values");
        }
    }

    #[test]
    fn chunk_square_sums_are_each_chunk_summed_in_order() {
        // Whole groups of sixteen chunks, a partial group, a short last chunk; values whose
        // squares round differently in another order.
        for (len, chunk) in [(0usize, 7usize), (5, 7), (16 * 7, 7), (33 * 7 + 3, 7), (40 * 64 + 1, 64), (70_001, 4096)]
        {
            let v: Vec<f32> = (0..len).map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i % 13) as f32) * 1e3).collect();
            let mut got = vec![0f64; len.div_ceil(chunk)];
            chunk_square_sums(&v, chunk, &mut got);
            let want: Vec<u64> =
                v.chunks(chunk).map(|c| c.iter().fold(0f64, |a, &x| a + (x as f64) * (x as f64)).to_bits()).collect();
            assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want, "len {len}, chunk {chunk}");
        }
    }

    #[test]
    fn adamw_gives_the_bits_of_the_plain_loop() {
        let n = 1000 + 7;
        let g: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.61).cos() * 1e-2).collect();
        let p0: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.23).sin()).collect();
        let m0: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.11).sin() * 1e-3).collect();
        let v0: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.07).cos().abs() * 1e-5).collect();
        let k = AdamWStep {
            keep: 1.0 - 1e-3 * 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step_size: 1e-3 / (1.0 - 0.9f32.powi(3)),
            bc2_sqrt: (1.0 - 0.999f32.powi(3)).sqrt(),
            grad_scale: 0.7,
        };
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        adamw(&mut p, &mut m, &mut v, &g, k);
        for i in 0..n {
            let gi = g[i] * k.grad_scale;
            let mi = m0[i] + (gi - m0[i]) * (1.0 - k.beta1);
            let vi = k.beta2 * v0[i] + (1.0 - k.beta2) * gi * gi;
            let pi = p0[i] * k.keep - k.step_size * mi / (vi.sqrt() / k.bc2_sqrt + k.eps);
            assert_eq!((p[i].to_bits(), m[i].to_bits(), v[i].to_bits()), (pi.to_bits(), mi.to_bits(), vi.to_bits()));
        }
    }

    #[test]
    fn wide_exponentials_match_the_scalar_ones() {
        for n in [0, 1, 15, 16, 17, 100] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.731).sin() * 30.0 - 10.0).collect();
            let (mut a, mut b) = (x.clone(), x.clone());
            let sa = exp_shifted_sum_wide(&mut a, 3.0);
            let sb: f32 = b
                .iter_mut()
                .map(|v| {
                    *v = (*v - 3.0).exp();
                    *v
                })
                .sum();
            assert!((sa - sb).abs() <= 1e-5 * sb.max(1.0), "n={n}: {sa} vs {sb}");
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() <= 2e-6 * q.max(1e-30), "n={n}: {p} vs {q}");
            }
        }
        let mut far = [-200.0f32, 0.0];
        assert_eq!(exp_shifted_sum_wide(&mut far, 0.0), 1.0);
        assert_eq!(far[0], 0.0);
    }

    #[test]
    fn plain_rust_normalisers_keep_a_vocabulary_of_tiny_terms() {
        // One likely token and 49151 at exp(-12) each (0.30 of the mass together), each a few
        // dozen ulps of a running sum near 1: a single f32 running sum rounds every one of them
        // the same way and drifts.
        let mut x = vec![-12.0f32; 49152];
        x[7] = 0.0;
        let want = (1.0 + 49151.0 * (-12f64).exp()).ln();
        let naive = x.iter().map(|v| v.exp()).fold(0f32, |s, v| s + v).ln();
        assert!((naive as f64 - want).abs() > 1e-4, "the case no longer shows the drift: {naive}");
        let lse = log_sum_exp_scalar(&x);
        let ess = exp_shifted_sum_scalar(&mut x.clone(), 0.0).ln();
        for (name, got) in [("log_sum_exp", lse), ("exp_shifted_sum", ess)] {
            assert!((got as f64 - want).abs() < 1e-6, "{name}: {got} vs {want}");
        }
    }

    #[test]
    fn dot_and_axpy_match_scalar_loops() {
        for n in [0, 5, 8, 16, 64, 67] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-5, "n={n}");
            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn dot_block_matches_pairwise_dots() {
        // na covers the 3-row tiles, the paired remainder and the single row; nb the 4-row
        // blocks and a tail; len a multiple of 8 (vector path) and not (scalar path); strided
        // rows (a kv head inside a cache row) and an output wider than nb.
        for (na, nb, len, sa, sb, ldo) in [
            (1, 4, 64, 64, 192, 4),
            (2, 7, 64, 70, 64, 9),
            (3, 9, 16, 16, 24, 9),
            (7, 13, 64, 64, 192, 20),
            (4, 5, 13, 13, 13, 5),
        ] {
            let a: Vec<f32> = (0..(na - 1) * sa + len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..(nb - 1) * sb + len).map(|i| (i as f32 * 0.11).cos()).collect();
            let mut out = vec![f32::NAN; (na - 1) * ldo + nb];
            dot_block(&a, sa, na, &b, sb, nb, len, &mut out, ldo);
            assert_row_dots(&a, sa, na, &b, sb, nb, len, &out, ldo, &format!("na={na} nb={nb} len={len}"));
        }
    }

    #[test]
    fn log_sum_exp_matches_f64() {
        for n in [1, 7, 8, 9, 67, 4099] {
            // Logit-like values far from 0, with the maximum in the scalar tail for some n.
            let x: Vec<f32> =
                (0..n).map(|i| 90.0 + 12.0 * (i as f32 * 0.731).sin() + (i == n - 1) as u8 as f32 * 9.0).collect();
            let max = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let want = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            let got = log_sum_exp(&x) as f64;
            assert!((got - want).abs() < 1e-4, "n={n}: {got} vs {want}");
            // The same value as the in-place routine it replaces.
            let mut w = x.clone();
            let m = max as f32;
            assert_eq!(got as f32, m + exp_shifted_sum(&mut w, m).ln(), "n={n}");
        }
    }

    #[test]
    fn weighted_rows_equal_axpy_row_by_row() {
        for (rows, d, stride) in [(0, 64, 64), (1, 64, 192), (37, 64, 192), (5, 72, 80), (9, 8, 8), (3, 130, 130)] {
            let src: Vec<f32> = (0..rows.max(1) * stride).map(|i| (i as f32 * 0.173).sin()).collect();
            let p: Vec<f32> = (0..rows).map(|j| if j % 4 == 2 { 0.0 } else { (j as f32 * 0.61).cos().abs() }).collect();
            let mut want = vec![0f32; d];
            for (j, &w) in p.iter().enumerate() {
                if w != 0.0 {
                    axpy(w, &src[j * stride..][..d], &mut want);
                }
            }
            let mut got = vec![f32::NAN; d];
            weighted_rows(&p, &src, stride, &mut got);
            assert_eq!(got, want, "rows={rows} d={d}");
        }
    }

    #[test]
    fn silu_mul_matches_scalar() {
        let g: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 7.3).collect();
        let u: Vec<f32> = (0..37).map(|i| (i as f32 * 0.3).cos()).collect();
        let mut out = vec![0f32; 37];
        silu_mul(&g, &u, &mut out);
        for i in 0..37 {
            let want = g[i] as f64 / (1.0 + (-(g[i] as f64)).exp()) * u[i] as f64;
            assert!((out[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{i}: {} vs {want}", out[i]);
        }
    }

    #[test]
    fn exp_matches_libm() {
        let mut x: Vec<f32> = (0..2000).map(|i| -90.0 + i as f32 * 0.0451).collect();
        x.push(f32::MIN);
        x.push(0.0);
        let want: Vec<f32> = x.iter().map(|v| (v - 0.5).exp()).collect();
        let sum = exp_shifted_sum(&mut x, 0.5);
        for (a, b) in x.iter().zip(&want) {
            let tol = b.abs() * 3e-7 + 1e-37;
            assert!((a - b).abs() <= tol, "{a} vs {b}");
        }
        let s: f32 = want.iter().sum();
        assert!((sum - s).abs() <= s * 1e-5);
    }
}
