//! Gradient buffers that weight products accumulate into, as PyTorch's `.grad`.
//!
//! candle's backward hands every gradient back as a fresh tensor and sums repeated ones into
//! another fresh tensor (`zeros` + `add`); for 135M weights that is ~1.6 GB of new memory per
//! step, paid in page faults. An optimizer registers one persistent buffer per parameter here;
//! the dense product's backward ([`crate::nn::linear`]) then writes `dyᵀ x` straight into it
//! (overwriting on the first write of a step, accumulating after), and returns no weight
//! gradient to candle.

use candle_core::{Tensor, TensorId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// One parameter's gradient storage.
pub struct GradBuf {
    data: Mutex<GradData>,
}

struct GradData {
    values: Vec<f32>,
    /// Whether `values` holds this step's gradient (else it is stale and the next write
    /// overwrites it).
    written: bool,
}

impl GradBuf {
    /// Adds to the gradient, or sets it if nothing was written since [`GradBuf::clear`]:
    /// `f(values, accumulate)` must write (or add) the new contribution.
    pub fn update(&self, f: impl FnOnce(&mut [f32], bool)) {
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let acc = d.written;
        f(&mut d.values, acc);
        d.written = true;
    }

    /// Whether a gradient was written since the last [`GradBuf::clear`].
    pub fn is_written(&self) -> bool {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).written
    }

    /// Runs `f` on the gradient if one was written this step.
    pub fn with<R>(&self, f: impl FnOnce(&mut [f32]) -> R) -> Option<R> {
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        d.written.then(|| f(&mut d.values))
    }

    /// Marks the gradient stale (the next step's first write overwrites it).
    pub fn clear(&self) {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).written = false;
    }
}

fn registry() -> &'static Mutex<HashMap<TensorId, Arc<GradBuf>>> {
    static R: OnceLock<Mutex<HashMap<TensorId, Arc<GradBuf>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Creates the buffer of `param` (a `Var`'s tensor); [`unregister`] frees it.
pub fn register(param: &Tensor) -> Arc<GradBuf> {
    let buf =
        Arc::new(GradBuf { data: Mutex::new(GradData { values: vec![0.0; param.elem_count()], written: false }) });
    registry().lock().unwrap_or_else(|p| p.into_inner()).insert(param.id(), buf.clone());
    buf
}

/// Drops the buffer of `param`.
pub fn unregister(param: &Tensor) {
    registry().lock().unwrap_or_else(|p| p.into_inner()).remove(&param.id());
}

/// The buffer of `param`, if an optimizer registered one.
pub fn buffer(param: &Tensor) -> Option<Arc<GradBuf>> {
    registry().lock().unwrap_or_else(|p| p.into_inner()).get(&param.id()).cloned()
}
