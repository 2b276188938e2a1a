//! The regrouped ("octet") layout of packed weights: the blocks of every 8 rows stored by column,
//! the same bytes as the GGUF blocks, and the batched and one-row products that read it.

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{AlignedBuf, PackedFormat, PackedWeight};
use crate::nn::simd::{has_avx2, has_avx512};
use crate::nn::team::{SharedMut, Team};

/// Rows per group in the interleaved layout: one AVX2 vector of f32.
pub(super) const OCTET: usize = 8;

/// Bytes before the quants in a block: `d`, and `m` for Q4_1.
pub(super) fn octet_head(format: PackedFormat) -> usize {
    if format == PackedFormat::Q4_1 {
        4
    } else {
        2
    }
}

pub(super) fn has_octet_kernel(format: PackedFormat) -> bool {
    cfg!(target_arch = "x86_64")
        && has_avx2()
        && matches!(format, PackedFormat::Q4_0 | PackedFormat::Q4_1 | PackedFormat::Q8_0)
}

/// Regroups the blocks of each 8 rows so that the batched kernel can expand them column-major.
/// For each group of 8 rows and each 32-column block, the 8 blocks become: their 8 scales `d`
/// (f16), for Q4_1 their 8 minima `m` (f16), then the quant bytes position-major (byte `i` of row
/// `r` at `8 i + r`). One 8-byte load then holds column `i` (and, for 4-bit formats, `i + 16`)
/// of all 8 rows, which expands straight into the `[k][8]` panel the kernel broadcasts against:
/// no transposition, and the same bytes as the GGUF blocks (so the same memory).
pub(super) fn interleave(format: PackedFormat, n: usize, k: usize, data: &[u8]) -> Vec<u8> {
    let bb = format.block_bytes();
    let nb = k / format.block_size();
    let rb = nb * bb;
    let head = octet_head(format);
    let nq = bb - head;
    let mut out = vec![0u8; data.len()];
    for g in 0..n / OCTET {
        for b in 0..nb {
            let sb = &mut out[(g * nb + b) * OCTET * bb..][..OCTET * bb];
            for r in 0..OCTET {
                let blk = &data[(g * OCTET + r) * rb + b * bb..][..bb];
                sb[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
                if head == 4 {
                    sb[16 + 2 * r..18 + 2 * r].copy_from_slice(&blk[2..4]);
                }
                for i in 0..nq {
                    sb[OCTET * head + i * OCTET + r] = blk[head + i];
                }
            }
        }
    }
    out
}

impl PackedWeight {
    /// `y = x wᵀ` from the interleaved layout. One row of x: fused expand-and-multiply per
    /// block, 16 rows of w at a time ([`x86::gemv_octets`]). Several rows: each thread expands
    /// 16 rows of w into a k-major panel (`[k][16]`, two octets) and runs every row of x against
    /// it, 6 at a time, each x value broadcast to 12 accumulators of 8 outputs. Both operands are
    /// reused from registers (x 16 times, the panel 6 times), so neither needs to stay in L1: the
    /// row-major tile kernel re-reads its 16 x rows (36 KB at k = 576, more than L1) for every
    /// 4 rows of w: a whole decoding step's products at a batch of 16 took 40 ms with it and 35
    /// with this one (examples/packed_speed).
    pub(super) fn matmul_octets(&self, x: &[f32], m: usize, out: &SharedMut<f32>) {
        #[cfg(target_arch = "x86_64")]
        {
            let (n, k) = (self.n, self.k);
            let sb = OCTET * self.row_bytes();
            let team = Team::global();
            if m == 1 {
                let chunk = (n / (team.threads() * 8)).next_multiple_of(16).max(16);
                let xsum: Vec<f32> = x.chunks_exact(32).map(|c| c.iter().sum()).collect();
                team.for_chunks(n, chunk, &|r| {
                    let data = &self.data[r.start / OCTET * sb..r.end / OCTET * sb];
                    // Safety: AVX2 present (the layout is only chosen then); this thread alone
                    // writes outputs r.
                    unsafe { x86::gemv_octets(self.format, data, sb, x, &xsum, out.0.add(r.start)) };
                });
                return;
            }
            // Finer chunks than the one-row product's: a thread finishing last waits alone, and a
            // panel costs the same whatever the chunk size.
            let chunk = (n / (team.threads() * 32)).next_multiple_of(16).max(16);
            team.for_chunks(n, chunk, &|range| {
                PANEL.with_borrow_mut(|buf| {
                    if buf.len < 2 * OCTET * k {
                        *buf = AlignedBuf::zeros(2 * OCTET * k);
                    }
                    let panel = buf.as_mut();
                    let mut j = range.start;
                    while j < range.end {
                        let p = if range.end - j >= 2 * OCTET { 2 } else { 1 };
                        for q in 0..p {
                            let src = &self.data[(j / OCTET + q) * sb..][..sb];
                            let half = &mut panel[q * OCTET * k..][..OCTET * k];
                            if has_avx512() {
                                // Safety: AVX-512 detected; `half` is one [k][8] half of the panel.
                                unsafe { x86::expand_octet_avx512(self.format, src, half) };
                            } else {
                                // Safety: AVX2 present (the layout is only chosen then); `half` is
                                // one [k][8] half of the panel.
                                unsafe { x86::expand_octet(self.format, src, half) };
                            }
                        }
                        if p == 2 && has_avx512() {
                            // Safety: AVX-512 detected; the panel holds two [k][8] halves; this
                            // thread alone writes columns j..j+16 of every row of y.
                            unsafe { x86::panel_rows_avx512(x, m, k, panel, out.0.add(j), n) };
                        } else {
                            // Safety: this thread alone writes columns j..j+8p of every row of y.
                            unsafe { x86::panel_rows(x, m, k, panel, p, out.0.add(j), n) };
                        }
                        j += p * OCTET;
                    }
                })
            });
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (x, m, out);
    }
}

thread_local! {
    /// Each team thread's panel buffer, kept between products (allocating and zeroing it per
    /// chunk showed up as memset in profiles).
    static PANEL: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::new(AlignedBuf::zeros(0));
}
