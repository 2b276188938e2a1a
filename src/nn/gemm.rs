//! Row-major f32 matrix products on the CPU through the `gemm` crate (the kernels candle's own
//! matmul uses), for custom ops that need a product without going through candle's graph: a
//! frozen weight's backward must not build or keep a weight gradient.

use crate::nn::team::{SharedMut, Team};
use gemm::Parallelism;

/// `c[m, n] = beta_c * c + op(a) · op(b)`, all row-major; `op(a)` is `a[m, k]`, or `a[k, m]ᵀ` when
/// `a_t`; `op(b)` is `b[k, n]`, or `b[n, k]ᵀ` when `b_t`. With `accumulate` the old `c` is added
/// (`beta_c = 1`), else overwritten.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
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
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "sgemm: buffers too small");
    if m == 0 || n == 0 {
        return;
    }
    let team = Team::global();
    if m * n * k < 1 << 18 || team.threads() < 2 {
        // Safety: the asserts above bound every index the strides reach.
        unsafe { block(m, n, k, a.as_ptr(), a_t, m, b.as_ptr(), b_t, n, c.as_mut_ptr(), n, k, accumulate) };
        return;
    }
    // Split the larger output side over the kernel team, each part a serial gemm: rayon's
    // wake-ups and the team's spinning helpers would otherwise fight over the same cores.
    let (pa, pb, pc) =
        (SharedMut(a.as_ptr() as *mut f32), SharedMut(b.as_ptr() as *mut f32), SharedMut(c.as_mut_ptr()));
    let split_cols = n >= m;
    let len = if split_cols { n } else { m };
    team.for_ranges(len, 16, &|r| {
        let (pa, pb, pc) = (&pa, &pb, &pc);
        if r.is_empty() {
            return;
        }
        // Safety: each part reads inside a/b and writes its own rows or columns of c.
        unsafe {
            if split_cols {
                let bo = if b_t { r.start * k } else { r.start };
                block(m, r.len(), k, pa.0, a_t, m, pb.0.add(bo), b_t, n, pc.0.add(r.start), n, k, accumulate);
            } else {
                let ao = if a_t { r.start } else { r.start * k };
                block(r.len(), n, k, pa.0.add(ao), a_t, m, pb.0, b_t, n, pc.0.add(r.start * n), n, k, accumulate);
            }
        }
    });
}

/// A serial gemm on an `m x n` block of `c` (row stride `ldc`); `a`/`b` are the full operands'
/// row strides: `lda_m` is the full `m` when `a_t` (a stored `[k, m]`), `ldb_n` the full `n` when
/// `b` is stored `[k, n]`.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    a_t: bool,
    lda_m: usize,
    b: *const f32,
    b_t: bool,
    ldb_n: usize,
    c: *mut f32,
    ldc: usize,
    kk: usize,
    accumulate: bool,
) {
    let (a_cs, a_rs) = if a_t { (lda_m as isize, 1) } else { (1, kk as isize) };
    let (b_cs, b_rs) = if b_t { (kk as isize, 1) } else { (1, ldb_n as isize) };
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        accumulate,
        a,
        a_cs,
        a_rs,
        b,
        b_cs,
        b_rs,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// A strided view of a matrix: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct View {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// Serial `c = (accumulate ? c : 0) + beta * a · b` on strided views (`a` is `m x k`, `b` is
/// `k x n`, `c` is `m x n`), for callers that already spread work over the team.
///
/// # Safety
/// Every element the views and strides reach must lie inside live allocations, and `c` must not
/// be written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_view(
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    c: *mut f32,
    c_rs: isize,
    accumulate: bool,
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        c_rs,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        if accumulate { 1.0 } else { 0.0 },
        beta,
        false,
        false,
        false,
        Parallelism::None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_match_the_definition() {
        for (m, n, k) in [(5, 7, 3), (70, 90, 80), (90, 70, 80)] {
            check(m, n, k);
        }
    }

    fn check(m: usize, n: usize, k: usize) {
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let want: Vec<f32> =
            (0..m * n).map(|i| (0..k).map(|l| a[(i / n) * k + l] * b[l * n + i % n]).sum::<f32>()).collect();
        let mut c = vec![1.0; m * n];
        sgemm(m, n, k, &a, false, &b, false, &mut c, false);
        assert!(c.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-4));
        sgemm(m, n, k, &a, false, &bt, true, &mut c, true);
        assert!(c.iter().zip(&want).all(|(x, y)| (x - 2.0 * y).abs() < 1e-4));
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        sgemm(m, n, k, &at, true, &b, false, &mut c, false);
        assert!(c.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-4));
    }
}
