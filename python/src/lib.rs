//! `attn_rs._native`: the workspace's stages called on NumPy arrays, in place.
//!
//! The Python half (`python/attn_rs`) turns torch tensors into arrays (a CPU tensor's
//! `.numpy()` shares its memory), checks what Python can name best (types, the algorithm),
//! and wraps these two calls in a `torch.autograd.Function`. Here the arrays are read as
//! ndarray views without a copy — whatever their strides — the options become the
//! contract's [`Options`], the GIL is released while the stage runs, and every
//! [`AttnError`] becomes a `ValueError` with the library's message, which names the
//! argument to change.

use attn::{AttnError, Device, Dropout, Forward, Inputs, Mask, Options, Stage, Window};
use numpy::{
    IntoPyArray, PyArray3, PyArray4, PyReadonlyArray2, PyReadonlyArray4, PyReadonlyArrayDyn,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

fn value_error(e: AttnError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// The stage `algo` on `device` ("cpu" or "cuda").
fn find_stage(algo: &str, device: &str) -> PyResult<&'static dyn Stage> {
    let dev = match device {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda,
        other => {
            return Err(PyValueError::new_err(format!(
                "device must be 'cpu' or 'cuda', not {other:?}"
            )));
        }
    };
    attn::stage(algo, dev).ok_or_else(|| {
        PyValueError::new_err(format!(
            "algo must be one of {:?}, not {algo:?}",
            attn::stage_names()
        ))
    })
}

/// The options every call takes, as Python passes them (a dict).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct CallOptions {
    causal: bool,
    scale: Option<f32>,
    dropout: f32,
    seed: u64,
    window: Option<(i64, i64)>,
    softcap: Option<f32>,
    q_block: Option<usize>,
    k_block: Option<usize>,
    deterministic: bool,
}

impl CallOptions {
    fn options(&self, bias_grad: bool) -> Options {
        Options {
            scale: self.scale,
            causal: self.causal,
            dropout: (self.dropout != 0.0).then(|| Dropout::new(self.dropout, self.seed)),
            q_block: self.q_block,
            k_block: self.k_block,
            window: self.window.map(|(l, r)| Window::new(l, r)),
            softcap: self.softcap,
            deterministic: self.deterministic,
            bias_grad,
            ..Options::default()
        }
    }
}

/// The arrays of a call, borrowed from Python for its length.
struct Arrays<'py> {
    q: PyReadonlyArray4<'py, f32>,
    k: PyReadonlyArray4<'py, f32>,
    v: PyReadonlyArray4<'py, f32>,
    mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    bias: Option<PyReadonlyArray4<'py, f32>>,
    alibi: Option<PyReadonlyArray2<'py, f32>>,
}

impl Arrays<'_> {
    /// The contract's inputs over the arrays, in place: a mask `[batch, n_k]` is key padding,
    /// a 4-D one broadcasts to `[batch, heads, n_q, n_k]`.
    fn inputs(&self) -> PyResult<Inputs<'_>> {
        let mut inputs = Inputs::new(self.q.as_array(), self.k.as_array(), self.v.as_array());
        if let Some(m) = &self.mask {
            let m = m.as_array();
            let mask = match m.ndim() {
                2 => Mask::KeyPadding(m.into_dimensionality().expect("2-D")),
                4 => Mask::Full(m.into_dimensionality().expect("4-D")),
                n => {
                    return Err(PyValueError::new_err(format!(
                        "mask must be 2-D [batch, n_k] (key padding) or 4-D, broadcastable to \
                         [batch, heads, n_q, n_k], but it has {n} dimensions"
                    )));
                }
            };
            inputs = inputs.with_mask(mask);
        }
        if let Some(b) = &self.bias {
            inputs = inputs.with_bias(b.as_array());
        }
        if let Some(a) = &self.alibi {
            inputs = inputs.with_alibi(a.as_array());
        }
        Ok(inputs)
    }
}

// ANCHOR: forward
/// The forward: `(out [batch, heads, n_q, d], lse [batch, heads, n_q])`, float32.
#[pyfunction]
#[pyo3(signature = (algo, device, q, k, v, mask, bias, alibi, opts))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn forward<'py>(
    py: Python<'py>,
    algo: &str,
    device: &str,
    q: PyReadonlyArray4<'py, f32>,
    k: PyReadonlyArray4<'py, f32>,
    v: PyReadonlyArray4<'py, f32>,
    mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    bias: Option<PyReadonlyArray4<'py, f32>>,
    alibi: Option<PyReadonlyArray2<'py, f32>>,
    opts: CallOptions,
) -> PyResult<(Bound<'py, PyArray4<f32>>, Bound<'py, PyArray3<f32>>)> {
    let stage = find_stage(algo, device)?;
    let arrays = Arrays { q, k, v, mask, bias, alibi };
    let inputs = arrays.inputs()?;
    let options = opts.options(false);
    let fwd = py.detach(|| stage.forward(&inputs, &options)).map_err(value_error)?;
    Ok((fwd.out.into_pyarray(py), fwd.lse.into_pyarray(py)))
}
// ANCHOR_END: forward

/// The backward for the upstream gradient `d_out`, given the forward's `out` and `lse`:
/// `(dq, dk, dv, dbias or None)`, float32, dbias in the bias's shape when `bias_grad`.
#[pyfunction]
#[pyo3(signature = (algo, device, q, k, v, mask, bias, alibi, opts, out, lse, d_out, bias_grad))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn backward<'py>(
    py: Python<'py>,
    algo: &str,
    device: &str,
    q: PyReadonlyArray4<'py, f32>,
    k: PyReadonlyArray4<'py, f32>,
    v: PyReadonlyArray4<'py, f32>,
    mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    bias: Option<PyReadonlyArray4<'py, f32>>,
    alibi: Option<PyReadonlyArray2<'py, f32>>,
    opts: CallOptions,
    out: PyReadonlyArray4<'py, f32>,
    lse: numpy::PyReadonlyArray3<'py, f32>,
    d_out: PyReadonlyArray4<'py, f32>,
    bias_grad: bool,
) -> PyResult<(
    Bound<'py, PyArray4<f32>>,
    Bound<'py, PyArray4<f32>>,
    Bound<'py, PyArray4<f32>>,
    Option<Bound<'py, PyArray4<f32>>>,
)> {
    let stage = find_stage(algo, device)?;
    let arrays = Arrays { q, k, v, mask, bias, alibi };
    let inputs = arrays.inputs()?;
    let options = opts.options(bias_grad);
    // the stage's backward takes its forward's results as it returned them
    let fwd =
        Forward { out: out.as_array().to_owned(), lse: lse.as_array().to_owned(), traffic: None };
    let d_out = d_out.as_array();
    let g = py.detach(|| stage.backward(&inputs, &options, &fwd, d_out)).map_err(value_error)?;
    Ok((
        g.dq.into_pyarray(py),
        g.dk.into_pyarray(py),
        g.dv.into_pyarray(py),
        g.dbias.map(|d| d.into_pyarray(py)),
    ))
}

/// The stage's forward on these arrays called `repeats` times from Rust, each call's
/// nanoseconds: what a Python call is measured against (the call overhead).
#[pyfunction]
#[pyo3(signature = (algo, device, q, k, v, opts, repeats))]
fn forward_times_ns<'py>(
    py: Python<'py>,
    algo: &str,
    device: &str,
    q: PyReadonlyArray4<'py, f32>,
    k: PyReadonlyArray4<'py, f32>,
    v: PyReadonlyArray4<'py, f32>,
    opts: CallOptions,
    repeats: usize,
) -> PyResult<Vec<u64>> {
    let stage = find_stage(algo, device)?;
    let inputs = Inputs::new(q.as_array(), k.as_array(), v.as_array());
    let options = opts.options(false);
    py.detach(|| {
        (0..repeats)
            .map(|_| {
                let t = std::time::Instant::now();
                std::hint::black_box(stage.forward(&inputs, &options)?);
                Ok(t.elapsed().as_nanos() as u64)
            })
            .collect::<attn::Result<Vec<u64>>>()
    })
    .map_err(value_error)
}

/// Device addresses of a CUDA call, as Python passes them (a dict of ints; 0 where unused).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Addresses {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    lse: u64,
    d_out: u64,
    dq: u64,
    dk: u64,
    dv: u64,
}

// ANCHOR: tc_call
/// FlashAttention-2 on the tensor cores over CUDA tensors that stay where they are: `at`
/// holds their device addresses (contiguous `[b, h, n, d]` bf16 / fp16, lse f32), `dims`
/// is `(batch, heads, kv_heads, n_q, n_k, head_dim)`, `stream` the caller's current CUDA
/// stream, which the call is ordered after and which waits for it in turn (events, no host
/// wait). The forward writes O and lse; with `backward`, dQ, dK and dV. The mask and ALiBi
/// slopes come as host arrays; the values of Q, K, V are the caller's to have checked.
#[pyfunction]
#[pyo3(signature = (dtype, dims, at, stream, mask, alibi, opts, backward))]
#[allow(clippy::too_many_arguments)]
fn tc_call<'py>(
    py: Python<'py>,
    dtype: &str,
    dims: (usize, usize, usize, usize, usize, usize),
    at: Addresses,
    stream: u64,
    mask: Option<PyReadonlyArrayDyn<'py, bool>>,
    alibi: Option<PyReadonlyArray2<'py, f32>>,
    opts: CallOptions,
    backward: bool,
) -> PyResult<()> {
    use attn::core::problem::stand_in;
    use attn::flash2::tc::{self, DeviceAt, bf16, f16};
    let (b, h, kvh, n_q, n_k, d) = dims;
    let mut shapes = Inputs::new(
        stand_in((b, h, n_q, d)),
        stand_in((b, kvh, n_k, d)),
        stand_in((b, kvh, n_k, d)),
    );
    let mask_view = mask.as_ref().map(|m| m.as_array());
    if let Some(m) = mask_view {
        shapes = shapes.with_mask(match m.ndim() {
            2 => Mask::KeyPadding(m.into_dimensionality().expect("2-D")),
            4 => Mask::Full(m.into_dimensionality().expect("4-D")),
            n => return Err(PyValueError::new_err(format!("mask must be 2-D or 4-D, not {n}-D"))),
        });
    }
    let alibi_view = alibi.as_ref().map(|a| a.as_array());
    if let Some(a) = alibi_view {
        shapes = shapes.with_alibi(a);
    }
    let options = opts.options(false);
    let at = DeviceAt {
        q: at.q,
        k: at.k,
        v: at.v,
        out: at.out,
        lse: at.lse,
        d_out: at.d_out,
        dq: at.dq,
        dk: at.dk,
        dv: at.dv,
    };
    py.detach(|| {
        let gpu = attn::cuda::gpu()?;
        // SAFETY: Python passes the data pointers of live, contiguous CUDA tensors of these
        // shapes and PyTorch's current stream of the same (primary) context; the kernels are
        // ordered after the stream's work so far, and the stream after the kernels.
        unsafe {
            gpu.wait_for(stream)?;
            match (dtype, backward) {
                ("bf16", false) => tc::forward_at::<bf16>(&shapes, &options, at)?,
                ("f16", false) => tc::forward_at::<f16>(&shapes, &options, at)?,
                ("bf16", true) => tc::backward_at::<bf16>(&shapes, &options, at)?,
                ("f16", true) => tc::backward_at::<f16>(&shapes, &options, at)?,
                _ => unreachable!("Python passes bf16 or f16"),
            }
            gpu.make_wait(stream)
        }
    })
    .map_err(value_error)
}
// ANCHOR_END: tc_call

/// The stage names `algo` takes, in the order of the story.
#[pyfunction]
fn stage_names() -> Vec<&'static str> {
    attn::stage_names()
}

/// Whether a CUDA device is present (the GPU stages run only then).
#[pyfunction]
fn cuda_available() -> bool {
    attn::cuda::available()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(forward, m)?)?;
    m.add_function(wrap_pyfunction!(backward, m)?)?;
    m.add_function(wrap_pyfunction!(forward_times_ns, m)?)?;
    m.add_function(wrap_pyfunction!(tc_call, m)?)?;
    m.add_function(wrap_pyfunction!(stage_names, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    Ok(())
}
