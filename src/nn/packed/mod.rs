//! Frozen weight matrices kept in a compact storage format (GGML blocks, f16, bf16) and multiplied
//! by f32 activations without first expanding the whole matrix.
//!
//! Why: CPU decoding is bound by memory bandwidth. SmolLM2-135M in f32 is 540 MB, which a 15 GB/s
//! machine reads at most ~28 times a second; its GGUF Q4_1 blocks are 85 MB. Blocks are expanded
//! into f32 in registers or L1 and multiplied with f32 activations, so results equal those of the
//! dequantized f32 model up to summation order (unlike ggml's kernels, which also quantize the
//! activations to 8 bits).
//!
//! Layout: `n` rows of `k` values; a row of a block format is `k / 32` blocks:
//! Q4_0 `{d: f16, qs: [u8; 16]}`, Q4_1 `{d: f16, m: f16, qs: [u8; 16]}`, Q8_0 `{d: f16, qs: [i8; 32]}`,
//! as in GGUF files. Rows arrive row-major, as in the file; on AVX2 machines the blocks of every 8
//! rows are then regrouped by column (`interleave`: same bytes, same memory) for the octet
//! kernels, which serve both one-row and batched products.

use crate::nn::gemm::{sgemm_view, View};
use crate::nn::simd::{dot_block_raw, has_avx2};
use crate::nn::team::{SharedMut, Team};
use crate::{Error, Result};
use candle_core::quantized::GgmlDType;
use half::{bf16, f16};
use rayon::prelude::*;

/// Storage formats with a fused dequantize-and-multiply kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedFormat {
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl PackedFormat {
    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F16 | Self::Bf16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F16 | Self::Bf16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    /// The packed format for a GGML dtype, if there is a kernel for it.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::F16 => Some(Self::F16),
            GgmlDType::BF16 => Some(Self::Bf16),
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Parses a user-facing name (`q8_0`, `q4_1`, `f16`, ...).
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            "q4_0" => Ok(Self::Q4_0),
            "q4_1" => Ok(Self::Q4_1),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(Error::Invalid(format!(
                "unknown weight format '{other}' (choose auto, f32, q8_0, q4_1, q4_0, f16 or bf16)"
            ))),
        }
    }
}

/// A frozen `[n, k]` weight matrix in a [`PackedFormat`].
#[derive(Debug, Clone)]
pub struct PackedWeight {
    format: PackedFormat,
    n: usize,
    k: usize,
    data: Vec<u8>,
    /// `data` holds the blocks regrouped by [`interleave`] (block formats with `n` a multiple
    /// of 8, on AVX2 machines) rather than GGUF's row-major order.
    interleaved: bool,
}

impl PackedWeight {
    /// Wraps raw rows (as stored in GGUF) of an `[n, k]` matrix.
    pub fn from_raw(format: PackedFormat, n: usize, k: usize, data: Vec<u8>) -> Result<Self> {
        let bs = format.block_size();
        if !k.is_multiple_of(bs) || data.len() != n * (k / bs) * format.block_bytes() {
            return Err(Error::Invalid(format!(
                "packed {format:?} weight [{n}, {k}]: row length must be a multiple of {bs} and \
                 the data {} bytes, got {}",
                n * (k / bs) * format.block_bytes(),
                data.len()
            )));
        }
        Ok(Self::new(format, n, k, data))
    }

    /// Takes row-major blocks and regroups them when the octet kernels can serve the matrix.
    fn new(format: PackedFormat, n: usize, k: usize, data: Vec<u8>) -> Self {
        if n.is_multiple_of(OCTET) && has_octet_kernel(format) {
            Self { format, n, k, data: interleave(format, n, k, &data), interleaved: true }
        } else {
            Self { format, n, k, data, interleaved: false }
        }
    }

    /// Row `j`'s blocks in GGUF order.
    fn raw_row(&self, j: usize) -> std::borrow::Cow<'_, [u8]> {
        let rb = self.row_bytes();
        if !self.interleaved {
            return std::borrow::Cow::Borrowed(&self.data[j * rb..(j + 1) * rb]);
        }
        let (bb, nb) = (self.format.block_bytes(), self.k / 32);
        let head = octet_head(self.format);
        let r = j % OCTET;
        let group = &self.data[j / OCTET * OCTET * rb..][..OCTET * rb];
        let mut row = vec![0u8; rb];
        for (b, blk) in row.chunks_exact_mut(bb).enumerate().take(nb) {
            let sb = &group[b * OCTET * bb..][..OCTET * bb];
            blk[..2].copy_from_slice(&sb[2 * r..2 * r + 2]);
            if head == 4 {
                blk[2..4].copy_from_slice(&sb[16 + 2 * r..18 + 2 * r]);
            }
            for (i, q) in blk[head..].iter_mut().enumerate() {
                *q = sb[OCTET * head + OCTET * i + r];
            }
        }
        std::borrow::Cow::Owned(row)
    }

    /// Quantizes/rounds an f32 `[n, k]` matrix (row-major) the way ggml's reference quantizers do.
    pub fn quantize(format: PackedFormat, n: usize, k: usize, w: &[f32]) -> Result<Self> {
        let bs = format.block_size();
        if w.len() != n * k || !k.is_multiple_of(bs) {
            return Err(Error::Invalid(format!(
                "cannot pack [{n}, {k}] as {format:?}: row length must be a multiple of {bs}"
            )));
        }
        let mut data = Vec::with_capacity(n * (k / bs) * format.block_bytes());
        for block in w.chunks_exact(bs) {
            match format {
                PackedFormat::F16 => data.extend_from_slice(&f16::from_f32(block[0]).to_le_bytes()),
                PackedFormat::Bf16 => data.extend_from_slice(&bf16::from_f32(block[0]).to_le_bytes()),
                PackedFormat::Q8_0 => {
                    let amax = block.iter().fold(0f32, |a, &v| a.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    data.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    data.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
                }
                PackedFormat::Q4_0 => {
                    // ggml: the value of largest magnitude maps to -8.
                    let max = block.iter().fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                    let d = max / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    data.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    let q = |v: f32| ((v * id + 8.5) as u8).min(15);
                    data.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
                }
                PackedFormat::Q4_1 => {
                    let min = block.iter().cloned().fold(f32::INFINITY, f32::min);
                    let max = block.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let d = (max - min) / 15.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    data.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    data.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                    let q = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
                    data.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
                }
            }
        }
        Self::from_raw(format, n, k, data)
    }

    /// Stacks the rows of matrices with the same format and input width (e.g. q, k and v
    /// projections), so one product replaces several; `None` if they differ.
    pub fn concat_rows(parts: &[&PackedWeight]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.format != first.format || p.k != first.k) {
            return None;
        }
        let (format, n, k) = (first.format, parts.iter().map(|p| p.n).sum(), first.k);
        if parts.iter().all(|p| p.interleaved) {
            // Whole octets one after another are the octets of the stacked rows.
            let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
            return Some(Self { format, n, k, data, interleaved: true });
        }
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            (0..p.n).for_each(|j| data.extend_from_slice(&p.raw_row(j)));
        }
        Some(Self::new(format, n, k, data))
    }

    /// Storage format.
    pub fn format(&self) -> PackedFormat {
        self.format
    }

    /// `(n, k)`: output and input features.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes of weight storage.
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.k / self.format.block_size() * self.format.block_bytes()
    }

    /// Expands row `j` into `out` (`k` values).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        dequantize_row(self.format, &self.raw_row(j), out)
    }

    /// [`Self::matmul_t`] for many rows of x (a long prompt): each thread expands its share of w's
    /// rows to f32 (1/(2m) of the product's work) and runs the dense kernels on them, which
    /// (AVX-512 where present) outrun the panel kernel once m is large.
    fn matmul_dense(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        let out = SharedMut(y.as_mut_ptr());
        Team::global().for_ranges(n, 16, &|cols| {
            let out = &out;
            if cols.is_empty() {
                return;
            }
            DENSE.with_borrow_mut(|buf| {
                buf.resize(cols.len() * k, 0.0);
                for (r, j) in cols.clone().enumerate() {
                    self.dequantize_row(j, &mut buf[r * k..(r + 1) * k]);
                }
                let xv = View { ptr: x.as_ptr(), rs: k as isize, cs: 1 };
                let wv = View { ptr: buf.as_ptr(), rs: 1, cs: k as isize };
                // Safety: x holds m rows of k, buf cols.len() rows of k; this thread alone writes
                // columns `cols` of every row of y.
                unsafe { sgemm_view(m, cols.len(), k, xv, wv, out.0.add(cols.start), n as isize, false, 1.0) };
            })
        });
        // Safety: the column ranges cover 0..n for every one of the m rows, all written above.
        unsafe { y.set_len(m * n) };
        y
    }

    /// The whole matrix in f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        out.par_chunks_mut(self.k).enumerate().for_each(|(j, row)| self.dequantize_row(j, row));
        out
    }

    /// `y[r, j] = sum_i x[r, i] * w[j, i]` for `x: [m, k]`, returning `y: [m, n]`.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        debug_assert_eq!(x.len(), m * k);
        if m >= DENSE_MIN_ROWS {
            return self.matmul_dense(x, m);
        }
        // y is not zeroed first (it is 3 MB for a batch of 16 through the LM head): the kernels
        // write every element through `out`, and only then does y get its length.
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        let out = SharedMut(y.as_mut_ptr());
        if self.interleaved {
            self.matmul_octets(x, m, &out);
        } else if m == 1 && has_octet_kernel(self.format) {
            self.gemv(x, &out);
        } else {
            // Each thread owns a contiguous range of y's columns; 4 rows of w at a time are
            // expanded into L1 and dotted with every row of x.
            let x = AlignedBuf::from_slice(x);
            let x = x.as_ref();
            let team = Team::global();
            let chunk = (n / (team.threads() * 8)).next_multiple_of(16).max(16);
            team.for_chunks(n, chunk, &|range| {
                let out = &out;
                let mut buf = AlignedBuf::zeros(TILE_N * k);
                let buf = buf.as_mut();
                let mut j = range.start;
                while j < range.end {
                    let rows = TILE_N.min(range.end - j);
                    for t in 0..rows {
                        self.dequantize_row(j + t, &mut buf[t * k..(t + 1) * k]);
                    }
                    // Safety: this thread alone writes columns j..j+rows of every row of y; x holds
                    // m rows of k and buf `rows` rows of k.
                    unsafe { dot_block_raw(x.as_ptr(), k, m, buf.as_ptr(), k, rows, k, out.0.add(j), n) };
                    j += rows;
                }
            });
        }
        // Safety: the column ranges cover 0..n for every one of the m rows, all written above.
        unsafe { y.set_len(m * n) };
        y
    }
}

impl PackedWeight {
    /// One row of x against every row of w without expanding w: per block,
    /// `d * dot(x, q) + m * sum(x)`. Writes all `n` outputs; only called when `has_octet_kernel` holds.
    fn gemv(&self, x: &[f32], out: &SharedMut<f32>) {
        #[cfg(target_arch = "x86_64")]
        {
            let rb = self.row_bytes();
            let x = AlignedBuf::from_slice(x);
            let x = x.as_ref();
            let xsum: Vec<f32> = x.chunks_exact(32).map(|c| c.iter().sum()).collect();
            let team = Team::global();
            let chunk = (self.n / (team.threads() * 8)).next_multiple_of(16).max(16);
            team.for_chunks(self.n, chunk, &|r| {
                let data = &self.data[r.start * rb..r.end * rb];
                // Safety: features detected (has_octet_kernel); this thread alone writes outputs r.
                unsafe { x86::gemv(self.format, data, rb, x, &xsum, out.0.add(r.start), r.len()) };
            });
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (x, out);
    }
}

const TILE_N: usize = 4;

/// From this many rows of x on, a product expands w to f32 and runs the dense kernels.
const DENSE_MIN_ROWS: usize = 64;

thread_local! {
    /// Each team thread's expanded rows of w for [`PackedWeight::matmul_dense`].
    static DENSE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An f32 buffer on 64-byte boundaries: 32-byte loads from a 16-byte aligned Vec split across
/// cache lines half the time, which was measured to cost the tile kernel a quarter of its speed.
pub(super) struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(align(64))]
#[allow(dead_code)] // storage only, read through raw pointers
struct Line([f32; 16]);

impl AlignedBuf {
    fn zeros(len: usize) -> Self {
        Self { lines: vec![Line([0.0; 16]); len.div_ceil(16)], len }
    }

    fn from_slice(v: &[f32]) -> Self {
        let mut b = Self::zeros(v.len());
        b.as_mut().copy_from_slice(v);
        b
    }

    fn as_ref(&self) -> &[f32] {
        // Safety: `lines` holds at least `len` contiguous f32s.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const f32, self.len) }
    }

    fn as_mut(&mut self) -> &mut [f32] {
        // Safety: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut f32, self.len) }
    }
}

/// Expands one row of `format` blocks into f32.
pub fn dequantize_row(format: PackedFormat, src: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // Safety: the CPU has the features the function is compiled for.
        unsafe { x86::dequantize_row(format, src, out) };
        return;
    }
    dequantize_row_scalar(format, src, out)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn dequantize_row_scalar(format: PackedFormat, src: &[u8], out: &mut [f32]) {
    let bb = format.block_bytes();
    match format {
        PackedFormat::F16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16_at(b, 0);
            }
        }
        PackedFormat::Bf16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        PackedFormat::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                for (v, &q) in o.iter_mut().zip(&b[2..34]) {
                    *v = d * (q as i8) as f32;
                }
            }
        }
        PackedFormat::Q4_0 | PackedFormat::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                let (m, qs) =
                    if format == PackedFormat::Q4_1 { (f16_at(b, 2), &b[4..20]) } else { (-8.0 * d, &b[2..18]) };
                for (j, &q) in qs.iter().enumerate() {
                    o[j] = ((q & 0x0f) as f32).mul_add(d, m);
                    o[j + 16] = ((q >> 4) as f32).mul_add(d, m);
                }
            }
        }
    }
}

mod octets;
#[cfg(target_arch = "x86_64")]
mod x86;

use octets::{has_octet_kernel, interleave, octet_head, OCTET};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::simd::assert_row_dots;

    fn sample(n: usize, seed: u32) -> Vec<f32> {
        // Deterministic values in [-1, 1) without an RNG dependency.
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(13).wrapping_mul(40503);
                (h % 20000) as f32 / 10000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn avx2_and_scalar_dequantization_agree() {
        let (n, k) = (8, 96);
        let w = sample(n * k, 7);
        for f in [PackedFormat::F16, PackedFormat::Bf16, PackedFormat::Q4_0, PackedFormat::Q4_1, PackedFormat::Q8_0] {
            let p = PackedWeight::quantize(f, n, k, &w).unwrap();
            for j in 0..n {
                let mut a = vec![0f32; k];
                let mut b = vec![0f32; k];
                dequantize_row(f, &p.raw_row(j), &mut a);
                dequantize_row_scalar(f, &p.raw_row(j), &mut b);
                assert_eq!(a, b, "{f:?}");
            }
        }
    }

    #[test]
    fn quantization_error_is_within_format_resolution() {
        // 16 rows: stored interleaved where the octet kernels apply, so this also checks that
        // regrouping and reading rows back lose nothing.
        let (n, k) = (16, 64);
        let w = sample(n * k, 3);
        // Half a step of each format's grid for values in [-1, 1].
        for (f, tol) in [
            (PackedFormat::F16, 1e-3),
            (PackedFormat::Bf16, 4e-3),
            (PackedFormat::Q8_0, 1.0 / 254.0 + 1e-3),
            (PackedFormat::Q4_0, 1.0 / 8.0 + 1e-3),
            (PackedFormat::Q4_1, 2.0 / 30.0 + 1e-3),
        ] {
            let d = PackedWeight::quantize(f, n, k, &w).unwrap().dequantize();
            let err = w.iter().zip(&d).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= tol, "{f:?}: max error {err} > {tol}");
        }
    }

    #[test]
    fn matmul_matches_dequantized_reference() {
        // Row-major kernel: m covers the 3-row blocks and the 1-row tail; n covers a partial tile.
        // Interleaved kernel (n a multiple of 8): m covers 6-row groups and every tail (1..5),
        // n an odd number of octets (one panel alone) and a long run of panel pairs.
        for (m, n, k) in [
            (1, 9, 64),
            (5, 13, 96),
            (16, 7, 32),
            (2, 3, 40),
            (16, 24, 96),
            (7, 8, 32),
            (11, 40, 64),
            (3, 136, 32),
            (1, 24, 64),
            (1, 32, 96),
        ] {
            let x = sample(m * k, 11);
            for f in [PackedFormat::Q4_1, PackedFormat::Q4_0, PackedFormat::Q8_0, PackedFormat::F16] {
                if !k.is_multiple_of(f.block_size()) {
                    continue;
                }
                let p = PackedWeight::quantize(f, n, k, &sample(n * k, 5)).unwrap();
                let w = p.dequantize();
                let y = p.matmul_t(&x, m);
                assert_row_dots(&x, k, m, &w, k, n, k, &y, n, &format!("{f:?} m={m} n={n}"));
            }
        }
    }

    #[test]
    fn interleaved_octets_expand_to_the_dequantized_rows() {
        let (n, k) = (16, 64);
        for f in [PackedFormat::Q4_0, PackedFormat::Q4_1, PackedFormat::Q8_0] {
            let p = PackedWeight::quantize(f, n, k, &sample(n * k, 9)).unwrap();
            if !p.interleaved {
                return; // no AVX2: the row-major kernels serve every product
            }
            let w = p.dequantize();
            let sb = p.data.len() / (n / OCTET);
            for g in 0..n / OCTET {
                let mut panel = AlignedBuf::zeros(OCTET * k);
                // Safety: octets are only built when AVX2 is present.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    x86::expand_octet(f, &p.data[g * sb..(g + 1) * sb], panel.as_mut())
                };
                for i in 0..k {
                    for t in 0..OCTET {
                        assert_eq!(panel.as_ref()[i * OCTET + t], w[(g * OCTET + t) * k + i], "{f:?} row {t} col {i}");
                    }
                }
                #[cfg(target_arch = "x86_64")]
                if crate::nn::simd::has_avx512() {
                    let mut wide = AlignedBuf::zeros(OCTET * k);
                    // Safety: AVX-512 detected; the same octet and panel size.
                    unsafe { x86::expand_octet_avx512(f, &p.data[g * sb..(g + 1) * sb], wide.as_mut()) };
                    let bits = |b: &AlignedBuf| b.as_ref().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&wide), bits(&panel), "{f:?} octet {g}: AVX-512 expansion");
                }
            }
        }
    }

    /// The AVX-512 panel tile sums every output in the AVX2 tile's order: bit-identical results
    /// (generation's sampled tokens, and results made on either machine, do not move).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_panel_tile_is_bit_identical_to_avx2() {
        if !(has_avx2() && crate::nn::simd::has_avx512()) {
            eprintln!("SKIPPED: this CPU (or MEET_SIMD) has no AVX-512");
            return;
        }
        for (m, k) in [(1, 32), (5, 64), (16, 576), (17, 96), (35, 160)] {
            let x = sample(m * k, 21);
            let mut panel = AlignedBuf::zeros(2 * OCTET * k);
            panel.as_mut().copy_from_slice(&sample(2 * OCTET * k, 22));
            let ldy = 2 * OCTET + 3;
            let (mut a, mut b) = (vec![f32::NAN; m * ldy], vec![f32::NAN; m * ldy]);
            // Safety: AVX2 and AVX-512 detected; x holds m rows of k, the panel two [k][8] halves,
            // a and b m rows of ldy >= 16.
            unsafe {
                x86::panel_rows(&x, m, k, panel.as_ref(), 2, a.as_mut_ptr(), ldy);
                x86::panel_rows_avx512(&x, m, k, panel.as_ref(), b.as_mut_ptr(), ldy);
            }
            for r in 0..m {
                for c in 0..2 * OCTET {
                    let (u, v) = (a[r * ldy + c], b[r * ldy + c]);
                    assert_eq!(u.to_bits(), v.to_bits(), "m {m} k {k} row {r} col {c}: {u} vs {v}");
                }
            }
        }
    }

    #[test]
    fn stacked_rows_equal_the_parts_in_either_layout() {
        // 8 + 3 + 5 + 8 rows: interleaved and row-major parts make an interleaved result; two
        // interleaved parts are stacked as they are.
        let k = 64;
        for f in [PackedFormat::Q4_1, PackedFormat::Q8_0, PackedFormat::F16] {
            let parts: Vec<PackedWeight> = [(8, 1), (3, 2), (5, 3), (8, 4)]
                .iter()
                .map(|&(n, seed)| PackedWeight::quantize(f, n, k, &sample(n * k, seed)).unwrap())
                .collect();
            let all = PackedWeight::concat_rows(&parts.iter().collect::<Vec<_>>()).unwrap();
            assert_eq!(all.dims(), (24, k));
            let octets = PackedWeight::concat_rows(&[&parts[0], &parts[3]]).unwrap();
            assert_eq!(octets.dequantize(), [parts[0].dequantize(), parts[3].dequantize()].concat(), "{f:?}");
            let want: Vec<f32> = parts.iter().flat_map(|p| p.dequantize()).collect();
            assert_eq!(all.dequantize(), want, "{f:?}");
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(PackedWeight::from_raw(PackedFormat::Q4_1, 2, 32, vec![0; 39]).is_err());
        assert!(PackedWeight::quantize(PackedFormat::Q8_0, 1, 33, &[0.0; 33]).is_err());
        assert!(PackedFormat::parse("q3_k").is_err());
    }
}
