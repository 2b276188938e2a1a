//! The AVX2/FMA bodies of [`super`]'s kernels: block expansion, the panel tile, the one-row
//! products from regrouped or row-major blocks; and the AVX-512 expansion and panel tile. Every function here
//! is `unsafe` because it is compiled for CPU features the caller must have detected first
//! (`has_avx2`, `has_avx512`); slices and pointers follow the bounds its caller checks.
// Several register arrays are indexed in lockstep; index loops read clearer than zipped iterators.
#![allow(clippy::needless_range_loop)]

use super::PackedFormat;
use std::arch::x86_64::*;

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_f16(b: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([*b, *b.add(1)]) as i32)))
}

/// Nibbles of 16 bytes: low halves are values 0..16, high halves 16..32 (GGML order).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles_to_f32(qs: *const u8, d: __m256, m: __m256, out: *mut f32) {
    // Widen bytes 0..8 and 8..16 to 32-bit lanes straight from memory, then split nibbles.
    let v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs as *const __m128i));
    let v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.add(8) as *const __m128i));
    let low = _mm256_set1_epi32(0x0f);
    let parts =
        [_mm256_and_si256(v0, low), _mm256_and_si256(v1, low), _mm256_srli_epi32(v0, 4), _mm256_srli_epi32(v1, 4)];
    for (i, v) in parts.into_iter().enumerate() {
        _mm256_storeu_ps(out.add(8 * i), _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), d, m));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dequantize_row(format: PackedFormat, src: &[u8], out: &mut [f32]) {
    let bb = format.block_bytes();
    let s = src.as_ptr();
    let o = out.as_mut_ptr();
    match format {
        PackedFormat::F16 => {
            let n = out.len();
            let mut i = 0;
            while i + 8 <= n {
                let h = _mm_loadu_si128(s.add(2 * i) as *const __m128i);
                _mm256_storeu_ps(o.add(i), _mm256_cvtph_ps(h));
                i += 8;
            }
            for j in i..n {
                *o.add(j) = load_f16(s.add(2 * j));
            }
        }
        PackedFormat::Bf16 => {
            let n = out.len();
            let mut i = 0;
            while i + 8 <= n {
                let h = _mm_loadu_si128(s.add(2 * i) as *const __m128i);
                let w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
                _mm256_storeu_ps(o.add(i), _mm256_castsi256_ps(w));
                i += 8;
            }
            for j in i..n {
                *o.add(j) = f32::from_bits((u16::from_le_bytes([*s.add(2 * j), *s.add(2 * j + 1)]) as u32) << 16);
            }
        }
        PackedFormat::Q8_0 => {
            for b in 0..out.len() / 32 {
                let blk = s.add(b * bb);
                let d = _mm256_set1_ps(load_f16(blk));
                for i in 0..4 {
                    let v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(2 + 8 * i) as *const __m128i));
                    _mm256_storeu_ps(o.add(b * 32 + 8 * i), _mm256_mul_ps(_mm256_cvtepi32_ps(v), d));
                }
            }
        }
        PackedFormat::Q4_0 => {
            for b in 0..out.len() / 32 {
                let blk = s.add(b * bb);
                let d = load_f16(blk);
                nibbles_to_f32(blk.add(2), _mm256_set1_ps(d), _mm256_set1_ps(-8.0 * d), o.add(b * 32));
            }
        }
        PackedFormat::Q4_1 => {
            for b in 0..out.len() / 32 {
                let blk = s.add(b * bb);
                // d and m are adjacent f16s: one load, one conversion.
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(blk as *const i32)));
                let (d, m) = (_mm256_broadcastss_ps(dm), _mm256_broadcastss_ps(_mm_movehdup_ps(dm)));
                nibbles_to_f32(blk.add(4), d, m, o.add(b * 32));
            }
        }
    }
}

/// Expands one interleaved octet row-group (see `interleave`) into a `[k][8]` panel, with the
/// same arithmetic as `dequantize_row` (so the same f32 values).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn expand_octet(format: PackedFormat, src: &[u8], out: &mut [f32]) {
    let bb = format.block_bytes();
    let s = src.as_ptr();
    let o = out.as_mut_ptr();
    for b in 0..out.len() / (32 * 8) {
        let sb = s.add(b * 8 * bb);
        let ob = o.add(b * 32 * 8);
        let d = _mm256_cvtph_ps(_mm_loadu_si128(sb as *const __m128i));
        match format {
            PackedFormat::Q8_0 => {
                for i in 0..32 {
                    let v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(sb.add(16 + 8 * i) as *const __m128i));
                    _mm256_store_ps(ob.add(8 * i), _mm256_mul_ps(_mm256_cvtepi32_ps(v), d));
                }
            }
            _ => {
                let (m, qs) = if format == PackedFormat::Q4_1 {
                    (_mm256_cvtph_ps(_mm_loadu_si128(sb.add(16) as *const __m128i)), sb.add(32))
                } else {
                    (_mm256_mul_ps(d, _mm256_set1_ps(-8.0)), sb.add(16))
                };
                let low = _mm256_set1_epi32(0x0f);
                for i in 0..16 {
                    let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.add(8 * i) as *const __m128i));
                    let (lo, hi) = (_mm256_and_si256(v, low), _mm256_srli_epi32(v, 4));
                    _mm256_store_ps(ob.add(8 * i), _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), d, m));
                    _mm256_store_ps(ob.add(8 * (i + 16)), _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), d, m));
                }
            }
        }
    }
}

/// [`expand_octet`] on AVX-512: two columns (16 values) per vector, the same `q * d + m` (or
/// `q * d`) per value, so the same f32 panel.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn expand_octet_avx512(format: PackedFormat, src: &[u8], out: &mut [f32]) {
    let bb = format.block_bytes();
    let s = src.as_ptr();
    let o = out.as_mut_ptr();
    // The 8 rows' f16 values, twice: lanes 0..8 and 8..16 are two columns of the same 8 rows.
    let twice = |p: *const u8| {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(h), h))
    };
    for b in 0..out.len() / (32 * 8) {
        let sb = s.add(b * 8 * bb);
        let ob = o.add(b * 32 * 8);
        let d = twice(sb);
        match format {
            PackedFormat::Q8_0 => {
                for i in (0..32).step_by(2) {
                    let v = _mm512_cvtepi8_epi32(_mm_loadu_si128(sb.add(16 + 8 * i) as *const __m128i));
                    _mm512_store_ps(ob.add(8 * i), _mm512_mul_ps(_mm512_cvtepi32_ps(v), d));
                }
            }
            _ => {
                let (m, qs) = if format == PackedFormat::Q4_1 {
                    (twice(sb.add(16)), sb.add(32))
                } else {
                    (_mm512_mul_ps(d, _mm512_set1_ps(-8.0)), sb.add(16))
                };
                let low = _mm512_set1_epi32(0x0f);
                for i in (0..16).step_by(2) {
                    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.add(8 * i) as *const __m128i));
                    let (lo, hi) = (_mm512_and_si512(v, low), _mm512_srli_epi32::<4>(v));
                    _mm512_store_ps(ob.add(8 * i), _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), d, m));
                    _mm512_store_ps(ob.add(8 * (i + 16)), _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), d, m));
                }
            }
        }
    }
}

/// `R` rows of x against `P` octet panels (`[k][8]` each, one after the other), writing
/// `y[r * ldy + 8p + t]`. (Blocking k so that the panel slice stays in L1 was measured
/// slower: the prefetchers serve the long sequential panel stream from L2 well.)
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn panel_tile<const R: usize, const P: usize>(
    xp: *const f32,
    k: usize,
    wp: *const f32,
    y: *mut f32,
    ldy: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); P]; R];
    for i in 0..k {
        let mut w = [_mm256_setzero_ps(); P];
        for p in 0..P {
            w[p] = _mm256_load_ps(wp.add(p * k * 8 + i * 8));
        }
        for r in 0..R {
            let b = _mm256_broadcast_ss(&*xp.add(r * k + i));
            for p in 0..P {
                acc[r][p] = _mm256_fmadd_ps(b, w[p], acc[r][p]);
            }
        }
    }
    for r in 0..R {
        for p in 0..P {
            _mm256_storeu_ps(y.add(r * ldy + p * 8), acc[r][p]);
        }
    }
}

/// Every row of `x` (`[m, k]`) against `p` (1 or 2) panels: 6 rows at a time (12 accumulators,
/// 2 panel vectors and a broadcast fill the 16 registers).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn panel_rows(x: &[f32], m: usize, k: usize, panel: &[f32], p: usize, y: *mut f32, ldy: usize) {
    let (xp, wp) = (x.as_ptr(), panel.as_ptr());
    let mut r = 0;
    while r < m {
        let rows = (m - r).min(6);
        let (xr, yr) = (xp.add(r * k), y.add(r * ldy));
        macro_rules! go {
            ($($n:literal),*) => {
                match (rows, p) {
                    $(($n, 2) => panel_tile::<$n, 2>(xr, k, wp, yr, ldy),
                      ($n, _) => panel_tile::<$n, 1>(xr, k, wp, yr, ldy),)*
                    _ => unreachable!(),
                }
            };
        }
        go!(1, 2, 3, 4, 5, 6);
        r += rows;
    }
}

/// [`panel_rows`] for two panels on AVX-512: the two `[k][8]` halves are joined into one
/// 16-wide vector per step of k and up to 16 rows of x run against it (16 accumulators), so at a
/// batch of 16 the panel streams through once instead of three times. Each output is the same
/// chain of FMAs over k in the same order as the AVX2 tile's, so the results are bit-identical.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn panel_rows_avx512(x: &[f32], m: usize, k: usize, panel: &[f32], y: *mut f32, ldy: usize) {
    let (xp, wp) = (x.as_ptr(), panel.as_ptr());
    let mut r = 0;
    while r < m {
        let rows = (m - r).min(16);
        let (xr, yr) = (xp.add(r * k), y.add(r * ldy));
        macro_rules! go {
            ($($n:literal),*) => {
                match rows {
                    $($n => panel_tile_avx512::<$n>(xr, k, wp, yr, ldy),)*
                    _ => unreachable!(),
                }
            };
        }
        go!(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16);
        r += rows;
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn panel_tile_avx512<const R: usize>(xp: *const f32, k: usize, wp: *const f32, y: *mut f32, ldy: usize) {
    let mut acc = [_mm512_setzero_ps(); R];
    let hi = wp.add(k * 8);
    for i in 0..k {
        let lo = _mm256_castps_pd(_mm256_load_ps(wp.add(i * 8)));
        let up = _mm256_castps_pd(_mm256_load_ps(hi.add(i * 8)));
        let w = _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castpd256_pd512(lo), up));
        for r in 0..R {
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(*xp.add(r * k + i)), w, acc[r]);
        }
    }
    for r in 0..R {
        _mm512_storeu_ps(y.add(r * ldy), acc[r]);
    }
}

/// One x row against octets of Q4_0/Q4_1/Q8_0 rows (`data`, `sb` bytes each), writing 8
/// outputs per octet. Per block: column i of 8 rows is widened to f32 and multiplied by
/// x[i] broadcast, then the block's sum is scaled by d and `m * sum(x)` added (as the
/// row-major `gemv`). Two octets share each broadcast; four partial sums per octet keep 8 FMA
/// chains in flight.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemv_octets(format: PackedFormat, data: &[u8], sb: usize, x: &[f32], xsum: &[f32], y: *mut f32) {
    let octets = data.len() / sb;
    let (mut g, src, xp, xs) = (0, data.as_ptr(), x.as_ptr(), xsum.as_ptr());
    macro_rules! go {
        ($p:literal) => {
            match format {
                PackedFormat::Q8_0 => gemv_octet_tile::<Q8, $p>(src.add(g * sb), sb, xp, xs, y.add(8 * g), x.len()),
                PackedFormat::Q4_0 => gemv_octet_tile::<Q40, $p>(src.add(g * sb), sb, xp, xs, y.add(8 * g), x.len()),
                PackedFormat::Q4_1 => gemv_octet_tile::<Q41, $p>(src.add(g * sb), sb, xp, xs, y.add(8 * g), x.len()),
                _ => unreachable!("octets are only built for block formats"),
            }
        };
    }
    while g + 2 <= octets {
        go!(2);
        g += 2;
    }
    if g < octets {
        go!(1);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn gemv_octet_tile<const F: u8, const P: usize>(
    src: *const u8,
    stride: usize,
    xp: *const f32,
    xsum: *const f32,
    y: *mut f32,
    k: usize,
) {
    let bb = match F {
        Q8 => 34,
        Q40 => 18,
        _ => 20,
    };
    let head = if F == Q41 { 32 } else { 16 };
    let low = _mm256_set1_epi32(0x0f);
    let mut acc = [_mm256_setzero_ps(); P];
    for b in 0..k / 32 {
        let xb = xp.add(32 * b);
        let q0 = src.add(b * 8 * bb + head);
        for p in 0..P {
            prefetch_ahead_of(src.add(p * stride + b * 8 * bb), 8 * bb);
        }
        let mut t = [[_mm256_setzero_ps(); 4]; P];
        if F == Q8 {
            for i in (0..32).step_by(4) {
                for c in 0..4 {
                    let xv = _mm256_broadcast_ss(&*xb.add(i + c));
                    for p in 0..P {
                        let q = q0.add(p * stride + 8 * (i + c));
                        let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(q as *const __m128i)));
                        t[p][c] = _mm256_fmadd_ps(xv, v, t[p][c]);
                    }
                }
            }
        } else {
            for i in (0..16).step_by(2) {
                for c in 0..2 {
                    let xlo = _mm256_broadcast_ss(&*xb.add(i + c));
                    let xhi = _mm256_broadcast_ss(&*xb.add(i + c + 16));
                    for p in 0..P {
                        let q = q0.add(p * stride + 8 * (i + c));
                        let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q as *const __m128i));
                        let lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, low));
                        let hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
                        t[p][2 * c] = _mm256_fmadd_ps(xlo, lo, t[p][2 * c]);
                        t[p][2 * c + 1] = _mm256_fmadd_ps(xhi, hi, t[p][2 * c + 1]);
                    }
                }
            }
        }
        for p in 0..P {
            let sbp = src.add(p * stride + b * 8 * bb);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(sbp as *const __m128i));
            let s = _mm256_add_ps(_mm256_add_ps(t[p][0], t[p][1]), _mm256_add_ps(t[p][2], t[p][3]));
            acc[p] = _mm256_fmadd_ps(s, d, acc[p]);
            if F != Q8 {
                let m = if F == Q41 {
                    _mm256_cvtph_ps(_mm_loadu_si128(sbp.add(16) as *const __m128i))
                } else {
                    _mm256_mul_ps(d, _mm256_set1_ps(-8.0))
                };
                acc[p] = _mm256_fmadd_ps(m, _mm256_broadcast_ss(&*xsum.add(b)), acc[p]);
            }
        }
    }
    for p in 0..P {
        _mm256_storeu_ps(y.add(8 * p), acc[p]);
    }
}

/// Fused dequantize-and-dot of one x row against `y.len()` rows of Q4_0/Q4_1/Q8_0 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemv(
    format: PackedFormat,
    rows: &[u8],
    rb: usize,
    x: &[f32],
    xsum: &[f32],
    y: *mut f32,
    n: usize,
) {
    match format {
        PackedFormat::Q8_0 => gemv_blocks::<Q8>(rows, rb, x, xsum, y, n),
        PackedFormat::Q4_0 => gemv_blocks::<Q40>(rows, rb, x, xsum, y, n),
        PackedFormat::Q4_1 => gemv_blocks::<Q41>(rows, rb, x, xsum, y, n),
        _ => unreachable!("gemv is only dispatched for block formats"),
    }
}

/// How far ahead of the block being read [`gemv_octets`] prefetches its weight stream. One row
/// of x makes decoding bound by the latency of the weights' lines (they come from the shared L3
/// or memory), which the hardware prefetchers do not hide at this rate of consumption:
/// `examples/packed_speed 1` per decoding step 9.1-9.4 ms without, 7.0-7.3 ms at 1 KB ahead,
/// 4.7-5.1 ms at 8 KB, no better further (16-64 KB), on a 2-core Xeon.
const PREFETCH_AHEAD: usize = 8192;

/// Prefetches the `len` bytes [`PREFETCH_AHEAD`] past `p` into L1.
///
/// # Safety
/// SSE only: a prefetch never faults, and the address is formed with `wrapping_add`, so it may
/// point past the end of the weights.
#[inline(always)]
unsafe fn prefetch_ahead_of(p: *const u8, len: usize) {
    for l in (0..len).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_AHEAD + l) as *const i8);
    }
}

const Q8: u8 = 0;
const Q40: u8 = 1;
const Q41: u8 = 2;

/// One block: `(dot(x, q) as 8 partial sums, d, m)` with `w = d q + m`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block<const F: u8>(blk: *const u8, xb: *const f32) -> (__m256, __m256, f32) {
    // d (and, for Q4_1, m) as f16 at the block start.
    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(blk as *const i32)));
    let d = _mm256_broadcastss_ps(dm);
    if F == Q8 {
        let q = blk.add(2);
        let mut t = _mm256_setzero_ps();
        for i in 0..4 {
            let v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.add(8 * i) as *const __m128i));
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xb.add(8 * i)), _mm256_cvtepi32_ps(v), t);
        }
        return (t, d, 0.0);
    }
    let (q, m) = if F == Q41 {
        (blk.add(4), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
    } else {
        (blk.add(2), -8.0 * _mm_cvtss_f32(dm))
    };
    // Bytes 0..8 and 8..16; low nibbles are values 0..16, high ones 16..32.
    let low = _mm256_set1_epi32(0x0f);
    let v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q as *const __m128i));
    let v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.add(8) as *const __m128i));
    let f = [_mm256_and_si256(v0, low), _mm256_and_si256(v1, low), _mm256_srli_epi32(v0, 4), _mm256_srli_epi32(v1, 4)];
    let mut t = _mm256_mul_ps(_mm256_loadu_ps(xb), _mm256_cvtepi32_ps(f[0]));
    for (i, fi) in f.iter().enumerate().skip(1) {
        t = _mm256_fmadd_ps(_mm256_loadu_ps(xb.add(8 * i)), _mm256_cvtepi32_ps(*fi), t);
    }
    (t, d, m)
}

/// Two blocks per step into two accumulators (named, so they stay in registers), two scalar
/// chains for the `m * sum(x)` terms.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_blocks<const F: u8>(rows: &[u8], rb: usize, x: &[f32], xsum: &[f32], y: *mut f32, n: usize) {
    let nb = x.len() / 32;
    let bb = rb / nb;
    let xp = x.as_ptr();
    for j in 0..n {
        let row = rows.as_ptr().add(j * rb);
        // The rows are one sequential stream, as the octets' are: fetched ahead the same way.
        prefetch_ahead_of(row, rb);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut m0, mut m1) = (0f32, 0f32);
        let mut b = 0;
        while b + 2 <= nb {
            let (t, d, m) = block::<F>(row.add(b * bb), xp.add(b * 32));
            acc0 = _mm256_fmadd_ps(t, d, acc0);
            m0 = m.mul_add(*xsum.get_unchecked(b), m0);
            let (t, d, m) = block::<F>(row.add((b + 1) * bb), xp.add((b + 1) * 32));
            acc1 = _mm256_fmadd_ps(t, d, acc1);
            m1 = m.mul_add(*xsum.get_unchecked(b + 1), m1);
            b += 2;
        }
        if b < nb {
            let (t, d, m) = block::<F>(row.add(b * bb), xp.add(b * 32));
            acc0 = _mm256_fmadd_ps(t, d, acc0);
            m0 = m.mul_add(*xsum.get_unchecked(b), m0);
        }
        *y.add(j) = hsum(_mm256_add_ps(acc0, acc1)) + (m0 + m1);
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}
