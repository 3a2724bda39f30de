//! DESIGN.md's tolerances: normwise relative error against the float64 reference.

/// f32 arithmetic (CPU, GPU CUDA cores), forward.
pub const F32_FORWARD: f64 = 1e-5;
/// f32 arithmetic, backward.
pub const F32_BACKWARD: f64 = 1e-4;
/// tf32 tensor cores, forward.
pub const TF32_FORWARD: f64 = 1e-3;
/// tf32 tensor cores, backward.
pub const TF32_BACKWARD: f64 = 3e-3;
/// bf16/fp16 operands with f32 accumulation, forward.
pub const HALF_FORWARD: f64 = 1e-2;
/// bf16/fp16 operands with f32 accumulation, backward.
pub const HALF_BACKWARD: f64 = 2e-2;

/// The elementwise bound that goes with a normwise one: the largest |x − r| may be this many
/// times the normwise tolerance, in units of rms(r). One wrong row among many exceeds it.
pub const ELEMENTWISE_FACTOR: f64 = 30.0;
