//! The AVX2/FMA (and AVX-512 F) bodies of [`super`]'s kernels. Every function here is `unsafe`
//! because it is compiled for CPU features the caller must have detected first (`has_avx2`,
//! `has_avx512`); the slices and pointers follow the bounds its safe wrapper checks.
// Register arrays are indexed in lockstep; index loops read clearer than zipped iterators.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    let n = x.len();
    let p = x.as_mut_ptr();
    let sh = _mm256_set1_ps(shift);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        let v = exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), sh));
        _mm256_storeu_ps(p.add(i), v);
        acc = _mm256_add_ps(acc, v);
        i += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    let mut sum: f32 = lanes.iter().sum();
    for j in i..n {
        let v = (*p.add(j) - shift).exp();
        *p.add(j) = v;
        sum += v;
    }
    sum
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn log_sum_exp(x: &[f32]) -> f32 {
    let n = x.len();
    let p = x.as_ptr();
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i + 8 <= n {
        m = _mm256_max_ps(m, _mm256_loadu_ps(p.add(i)));
        i += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    let max = lanes.iter().chain(&x[i..]).copied().fold(f32::NEG_INFINITY, f32::max);
    let sh = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    i = 0;
    while i + 8 <= n {
        acc = _mm256_add_ps(acc, exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), sh)));
        i += 8;
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    let mut sum: f32 = lanes.iter().sum();
    for &v in &x[i..] {
        sum += (v - max).exp();
    }
    max + sum.ln()
}

/// `R` rows of `a` against 4 rows of `b`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize>(
    a: *const f32,
    sa: usize,
    b: *const f32,
    sb: usize,
    len: usize,
    y: *mut f32,
    ldy: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    let mut i = 0;
    while i < len {
        let mut x = [_mm256_setzero_ps(); R];
        for (s, xv) in x.iter_mut().enumerate() {
            *xv = _mm256_loadu_ps(a.add(s * sa + i));
        }
        for t in 0..4 {
            let w = _mm256_loadu_ps(b.add(t * sb + i));
            for (s, xv) in x.iter().enumerate() {
                acc[s][t] = _mm256_fmadd_ps(*xv, w, acc[s][t]);
            }
        }
        i += 8;
    }
    for (s, row) in acc.iter().enumerate() {
        _mm_storeu_ps(y.add(s * ldy), hsum4(*row));
    }
}

/// The four horizontal sums of `a` as one vector (the tile's four adjacent outputs of a row):
/// three `hadd`s and one add instead of four separate reductions.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum4(a: [__m256; 4]) -> __m128 {
    let h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1))
}

/// Every row of `a` against 4 rows of `b` (`len` a multiple of 8). Three rows of `a` at a
/// time keep 12 accumulators plus 4 loads within the 16 ymm registers; a remainder of 1 or 2
/// rows is paired up so that at least 8 FMA chains stay in flight.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dot_block4(
    a: *const f32,
    sa: usize,
    m: usize,
    b: *const f32,
    sb: usize,
    len: usize,
    y: *mut f32,
    ldy: usize,
) {
    let mut r = 0;
    let threes = if m % 3 == 1 && m >= 4 { m / 3 - 1 } else { m / 3 };
    for _ in 0..threes {
        tile::<3>(a.add(r * sa), sa, b, sb, len, y.add(r * ldy), ldy);
        r += 3;
    }
    while m - r >= 2 {
        tile::<2>(a.add(r * sa), sa, b, sb, len, y.add(r * ldy), ldy);
        r += 2;
    }
    if r < m {
        // A single row: two accumulators per row of b hide the FMA latency.
        let x0 = a.add(r * sa);
        let mut acc = [[_mm256_setzero_ps(); 4]; 2];
        let mut i = 0;
        while i + 16 <= len {
            let a0 = _mm256_loadu_ps(x0.add(i));
            let a1 = _mm256_loadu_ps(x0.add(i + 8));
            for t in 0..4 {
                acc[0][t] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b.add(t * sb + i)), acc[0][t]);
                acc[1][t] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(b.add(t * sb + i + 8)), acc[1][t]);
            }
            i += 16;
        }
        if i < len {
            let a0 = _mm256_loadu_ps(x0.add(i));
            for t in 0..4 {
                acc[0][t] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b.add(t * sb + i)), acc[0][t]);
            }
        }
        let mut sums = [_mm256_setzero_ps(); 4];
        for t in 0..4 {
            sums[t] = _mm256_add_ps(acc[0][t], acc[1][t]);
        }
        _mm_storeu_ps(y.add(r * ldy), hsum4(sums));
    }
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), s1);
        i += 16;
    }
    if i + 8 <= n {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        i += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(s0, s1));
    let mut sum: f32 = lanes.iter().sum();
    for j in i..n {
        sum += *pa.add(j) * *pb.add(j);
    }
    sum
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn weighted_rows(p: &[f32], src: &[f32], stride: usize, out: &mut [f32]) {
    let d = out.len();
    let (ps, po) = (src.as_ptr(), out.as_mut_ptr());
    let mut c = 0;
    while c + 64 <= d {
        let mut acc = [_mm256_setzero_ps(); 8];
        for (j, &w) in p.iter().enumerate() {
            if w != 0.0 {
                let (wv, row) = (_mm256_set1_ps(w), ps.add(j * stride + c));
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row.add(8 * i)), *a);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(po.add(c + 8 * i), *a);
        }
        c += 64;
    }
    if c < d {
        // Columns past the last full stripe, row by row.
        let tail = &mut out[c..];
        tail.fill(0.0);
        for (j, &w) in p.iter().enumerate() {
            if w != 0.0 {
                axpy(w, &src[j * stride + c..][..d - c], tail);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len();
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let a = _mm256_set1_ps(alpha);
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(a, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i))));
        i += 8;
    }
    for j in i..n {
        *py.add(j) += alpha * *px.add(j);
    }
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn silu_mul_grads(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    let n = g.len();
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_loadu_ps(g.as_ptr().add(i));
        let s = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
        let d = _mm256_loadu_ps(dy.as_ptr().add(i));
        let uu = _mm256_loadu_ps(u.as_ptr().add(i));
        let ds = _mm256_mul_ps(s, _mm256_fmadd_ps(x, _mm256_sub_ps(one, s), one));
        _mm256_storeu_ps(dg.as_mut_ptr().add(i), _mm256_mul_ps(_mm256_mul_ps(d, uu), ds));
        _mm256_storeu_ps(du.as_mut_ptr().add(i), _mm256_mul_ps(d, _mm256_mul_ps(x, s)));
        i += 8;
    }
    for j in i..n {
        let s = 1.0 / (1.0 + (-g[j]).exp());
        dg[j] = dy[j] * u[j] * s * (1.0 + g[j] * (1.0 - s));
        du[j] = dy[j] * g[j] * s;
    }
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    let n = g.len();
    let (pg, pu, po) = (g.as_ptr(), u.as_ptr(), out.as_mut_ptr());
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_loadu_ps(pg.add(i));
        let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), x));
        let silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
        _mm256_storeu_ps(po.add(i), _mm256_mul_ps(silu, _mm256_loadu_ps(pu.add(i))));
        i += 8;
    }
    for j in i..n {
        let a = *pg.add(j);
        *po.add(j) = a / (1.0 + (-a).exp()) * *pu.add(j);
    }
}

#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exp_shifted_sum_512(x: &mut [f32], shift: f32) -> f32 {
    let n = x.len();
    let p = x.as_mut_ptr();
    let sh = _mm512_set1_ps(shift);
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        let v = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), sh));
        _mm512_storeu_ps(p.add(i), v);
        acc = _mm512_add_ps(acc, v);
        i += 16;
    }
    if i < n {
        // The tail through a lane mask: no scalar loop.
        let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        let v = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), sh));
        _mm512_mask_storeu_ps(p.add(i), m, v);
        acc = _mm512_mask_add_ps(acc, m, acc, v);
    }
    _mm512_reduce_add_ps(acc)
}

/// `tanh(u) = 1 − 2 / (exp(2u) + 1)` on 16 lanes (exact at both saturations: exp gives inf or 0).
#[target_feature(enable = "avx512f")]
unsafe fn tanh512(u: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    let e = exp512(_mm512_add_ps(u, u));
    _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0), _mm512_add_ps(e, one)))
}

/// `t = tanh(k (x + c x³))` of GELU-new on 16 lanes.
#[target_feature(enable = "avx512f")]
unsafe fn gelu_tanh512(v: __m512) -> __m512 {
    let x3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
    let inner = _mm512_mul_ps(_mm512_set1_ps(super::GELU_K), _mm512_fmadd_ps(_mm512_set1_ps(super::GELU_C), x3, v));
    tanh512(inner)
}

#[target_feature(enable = "avx512f")]
pub(super) unsafe fn gelu_new_512(x: &[f32], out: &mut [f32]) {
    let n = x.len();
    let (px, po) = (x.as_ptr(), out.as_mut_ptr());
    let (half, one) = (_mm512_set1_ps(0.5), _mm512_set1_ps(1.0));
    let mut i = 0;
    while i < n {
        // Whole vectors, then the tail through a lane mask.
        let m: __mmask16 = if i + 16 <= n { 0xffff } else { ((1u32 << (n - i)) - 1) as u16 };
        let v = _mm512_maskz_loadu_ps(m, px.add(i));
        let y = _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, gelu_tanh512(v)));
        _mm512_mask_storeu_ps(po.add(i), m, y);
        i += 16;
    }
}

#[target_feature(enable = "avx512f")]
pub(super) unsafe fn gelu_new_grad_512(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    let n = x.len();
    let (px, pd, po) = (x.as_ptr(), dy.as_ptr(), dx.as_mut_ptr());
    let (half, one) = (_mm512_set1_ps(0.5), _mm512_set1_ps(1.0));
    let (k, c3) = (_mm512_set1_ps(super::GELU_K), _mm512_set1_ps(3.0 * super::GELU_C));
    let mut i = 0;
    while i < n {
        let m: __mmask16 = if i + 16 <= n { 0xffff } else { ((1u32 << (n - i)) - 1) as u16 };
        let v = _mm512_maskz_loadu_ps(m, px.add(i));
        let t = gelu_tanh512(v);
        // 0.5 (1 + t) + 0.5 x (1 − t²) k (1 + 3 c x²)
        let sech2 = _mm512_fnmadd_ps(t, t, one);
        let slope = _mm512_mul_ps(k, _mm512_fmadd_ps(c3, _mm512_mul_ps(v, v), one));
        let d = _mm512_fmadd_ps(
            _mm512_mul_ps(_mm512_mul_ps(half, v), sech2),
            slope,
            _mm512_mul_ps(half, _mm512_add_ps(one, t)),
        );
        _mm512_mask_storeu_ps(po.add(i), m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, pd.add(i)), d));
        i += 16;
    }
}

/// [`exp256`] on 16 lanes (the same range reduction and polynomial).
#[target_feature(enable = "avx512f")]
unsafe fn exp512(x: __m512) -> __m512 {
    let lo = _mm512_set1_ps(-87.336_55);
    let underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    let x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.376_26));
    let n = _mm512_roundscale_ps(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5_f32] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
    }
    let y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    let pow2 =
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
    _mm512_maskz_mul_ps(!underflow, y, pow2)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn exp256(x: __m256) -> __m256 {
    let lo = _mm256_set1_ps(-87.336_55);
    let underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    let x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.376_26));
    // n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for accuracy).
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5_f32] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(_mm256_mul_ps(y, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    let pow2 =
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    _mm256_andnot_ps(underflow, _mm256_mul_ps(y, pow2))
}

/// [`super::chunk_square_sums`] for the whole chunks, sixteen at a time (one per lane of a
/// gather), the last fewer than sixteen in masked lanes (a LoRA factor of 64 x 576 is 9 chunks of
/// 4096); returns how many chunks it summed (the caller sums the partial last one).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn chunk_square_sums_512(v: &[f32], chunk: usize, out: &mut [f64]) -> usize {
    let whole = v.len() / chunk;
    let groups = whole.div_ceil(16);
    // Lane j reads chunk j of the group: offsets j * chunk (below 2^31: chunk < 2^26).
    let idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(chunk as i32),
    );
    for gi in 0..groups {
        // Lanes of the chunks that exist: all sixteen but in the last group. A masked-off lane
        // reads nothing and adds zeros, and its sum is not stored.
        let lanes = (whole - gi * 16).min(16);
        let mask = (((1u32 << lanes) - 1) & 0xffff) as __mmask16;
        let base = v.as_ptr().add(gi * 16 * chunk);
        let (mut lo, mut hi) = (_mm512_setzero_pd(), _mm512_setzero_pd());
        for i in 0..chunk {
            let x = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, idx, base.add(i));
            let xl = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
            let xh = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x))));
            lo = _mm512_fmadd_pd(xl, xl, lo);
            hi = _mm512_fmadd_pd(xh, xh, hi);
        }
        _mm512_mask_storeu_pd(out.as_mut_ptr().add(gi * 16), mask as u8, lo);
        _mm512_mask_storeu_pd(out.as_mut_ptr().add(gi * 16 + 8), (mask >> 8) as u8, hi);
    }
    whole
}

#[target_feature(enable = "avx512f")]
pub(super) unsafe fn adamw_512(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: super::AdamWStep) {
    super::adamw_body(p, m, v, g, k)
}

/// [`silu_mul`] sixteen lanes at a time: the same arithmetic per element ([`exp512`] is
/// [`exp256`] widened), the last `n % 16` through [`silu_mul`] itself, so every element gets the
/// bits the AVX2 kernel gives it.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn silu_mul_512(g: &[f32], u: &[f32], out: &mut [f32]) {
    let n = g.len();
    let (pg, pu, po) = (g.as_ptr(), u.as_ptr(), out.as_mut_ptr());
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i + 16 <= n {
        let x = _mm512_loadu_ps(pg.add(i));
        let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
        let silu = _mm512_div_ps(x, _mm512_add_ps(one, e));
        _mm512_storeu_ps(po.add(i), _mm512_mul_ps(silu, _mm512_loadu_ps(pu.add(i))));
        i += 16;
    }
    silu_mul(&g[i..], &u[i..], &mut out[i..]);
}

/// [`silu_mul_grads`] sixteen lanes at a time, as [`silu_mul_512`] widens [`silu_mul`].
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn silu_mul_grads_512(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    let n = g.len();
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i + 16 <= n {
        let x = _mm512_loadu_ps(g.as_ptr().add(i));
        let s = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
        let d = _mm512_loadu_ps(dy.as_ptr().add(i));
        let uu = _mm512_loadu_ps(u.as_ptr().add(i));
        let ds = _mm512_mul_ps(s, _mm512_fmadd_ps(x, _mm512_sub_ps(one, s), one));
        _mm512_storeu_ps(dg.as_mut_ptr().add(i), _mm512_mul_ps(_mm512_mul_ps(d, uu), ds));
        _mm512_storeu_ps(du.as_mut_ptr().add(i), _mm512_mul_ps(d, _mm512_mul_ps(x, s)));
        i += 16;
    }
    silu_mul_grads(&g[i..], &u[i..], &dy[i..], &mut dg[i..], &mut du[i..]);
}
