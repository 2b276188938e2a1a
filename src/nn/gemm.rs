//! Row-major f32 matrix products on the CPU through the `gemm` crate (the kernels candle's own
//! matmul uses), for custom ops that need a product without going through candle's graph: a
//! frozen weight's backward must not build or keep a weight gradient.

use crate::nn::team::{SharedMut, Team};
use gemm::Parallelism;

/// `c[m, n] = beta_c * c + op(a) · op(b)`, all row-major; `op(a)` is `a[m, k]`, or `a[k, m]ᵀ` when
/// `a_t`; `op(b)` is `b[k, n]`, or `b[n, k]ᵀ` when `b_t`. With `accumulate` the old `c` is added
/// (`beta_c = 1`), else overwritten. Always f32; the layers call
/// [`crate::nn::bf16::sgemm_autocast`], which comes here outside autocast.
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
    // An empty sum: zeros, written here since callers may pass an unfilled `c`.
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    // Row and column strides of op(a) (m x k) and op(b) (k x n) in their row-major storage.
    let (a_rs, a_cs) = if a_t { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if b_t { (1, k) } else { (n, 1) };
    let team = Team::global();
    if m * n * k < 1 << 18 || team.threads() < 2 {
        let (av, bv) = (View::new(a.as_ptr(), a_rs, a_cs), View::new(b.as_ptr(), b_rs, b_cs));
        // Safety: the asserts above bound every index the strides reach.
        unsafe { sgemm_view(m, n, k, av, bv, c.as_mut_ptr(), n as isize, accumulate, 1.0) };
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
            let (av, bv) = (View::new(pa.0, a_rs, a_cs), View::new(pb.0, b_rs, b_cs));
            if split_cols {
                let bv = View { ptr: bv.ptr.add(r.start * b_cs), ..bv };
                sgemm_view(m, r.len(), k, av, bv, pc.0.add(r.start), n as isize, accumulate, 1.0);
            } else {
                let av = View { ptr: av.ptr.add(r.start * a_rs), ..av };
                sgemm_view(r.len(), n, k, av, bv, pc.0.add(r.start * n), n as isize, accumulate, 1.0);
            }
        }
    });
}

/// A strided view of a matrix: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct View {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl View {
    fn new(ptr: *const f32, rs: usize, cs: usize) -> Self {
        Self { ptr, rs: rs as isize, cs: cs as isize }
    }
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
