//! The device: one context, its stream, NVRTC modules, counted buffers, events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use attn_core::{AttnError, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaModule, CudaSlice, CudaStream, DevicePtr};
pub use cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
use ndarray::{Array, ArrayView, Dimension, IntoDimension};

/// The process's GPU: one context on device 0, its default stream, compiled modules.
#[derive(Debug)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    arch: &'static str,
    multiprocessors: usize,
    devices: usize,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    live: AtomicUsize,
    peak: AtomicUsize,
}

static GPU: OnceLock<std::result::Result<Gpu, String>> = OnceLock::new();

/// The process's CUDA device, opened on first use.
pub fn gpu() -> Result<&'static Gpu> {
    GPU.get_or_init(Gpu::open)
        .as_ref()
        .map_err(|reason| AttnError::NoCudaDevice { reason: reason.clone() })
}

/// Whether a CUDA device can be used (tests skip, saying so, where it cannot).
pub fn available() -> bool {
    gpu().is_ok()
}

/// For tests that need a device: true, after printing `skipped: <why>`, where there is none.
pub fn skip_without_device() -> bool {
    match gpu() {
        Ok(_) => false,
        Err(e) => {
            eprintln!("skipped: {e}");
            true
        }
    }
}

/// Maps a driver or NVRTC error into the contract's error type.
pub fn cuda_err(
    context: impl Into<String>,
) -> impl FnOnce(cudarc::driver::DriverError) -> AttnError {
    let context = context.into();
    move |e| AttnError::Cuda { context, message: e.to_string() }
}

impl Gpu {
    fn open() -> std::result::Result<Gpu, String> {
        // SAFETY: both probes only try to load the shared libraries; nothing else is called
        // through them when they are missing.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("the CUDA driver library (libcuda) is not installed".into());
        }
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err("the CUDA runtime compiler (libnvrtc) is not installed".into());
        }
        let count = CudaContext::device_count().map_err(|e| format!("the driver failed: {e}"))?;
        if count < 1 {
            return Err("the driver sees no device".into());
        }
        let ctx = CudaContext::new(0).map_err(|e| format!("cannot open device 0: {e}"))?;
        // One stream: nothing to synchronise between streams, so no per-launch events.
        // SAFETY: every buffer and launch of this crate uses the one default stream.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(|e| e.to_string())?;
        let name = ctx.name().map_err(|e| e.to_string())?;
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let multiprocessors = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| e.to_string())? as usize;
        let stream = ctx.default_stream();
        Ok(Gpu {
            ctx,
            stream,
            name,
            arch,
            multiprocessors,
            devices: count as usize,
            modules: Mutex::new(HashMap::new()),
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        })
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The architecture kernels are compiled for, e.g. "sm_90".
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// The number of streaming multiprocessors (132 on an H100 SXM).
    pub fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }

    /// How many devices the driver sees (this library opens the first).
    pub fn devices(&self) -> usize {
        self.devices
    }

    /// Makes the device's context current on the calling thread (for libraries, such as
    /// cuBLAS, that launch through the runtime API).
    pub fn bind(&self) -> std::result::Result<(), cudarc::driver::DriverError> {
        self.ctx.bind_to_thread()
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Kernel `function` of module `module`, whose CUDA source is `sources` concatenated (for
    /// example `[CONTRACT_HEADER, include_str!("../kernels/naive.cu")]`). The module is
    /// compiled by NVRTC for this device the first time it is asked for.
    pub fn function(
        &self,
        module: &'static str,
        sources: &[&str],
        function: &str,
    ) -> Result<CudaFunction> {
        self.function_of(module, module, sources, &[], function)
    }

    /// [`Gpu::function`] of a module compiled with `defines` (`NAME=VALUE` pairs, passed to
    /// NVRTC as `-D`): a kernel template's instantiation for the call's type and head
    /// dimension, compiled when first asked for and cached under the module's name and its
    /// defines.
    pub fn function_with(
        &self,
        module: &'static str,
        sources: &[&str],
        defines: &[(&str, &str)],
        function: &str,
    ) -> Result<CudaFunction> {
        let options: Vec<String> = defines.iter().map(|(k, v)| format!("-D{k}={v}")).collect();
        let key = format!("{module}[{}]", options.join(" "));
        self.function_of(&key, module, sources, &options, function)
    }

    /// Kernel `function` of the module cached under `key`, compiled from `sources` with
    /// `options` the first time.
    fn function_of(
        &self,
        key: &str,
        module: &str,
        sources: &[&str],
        options: &[String],
        function: &str,
    ) -> Result<CudaFunction> {
        let lock = || self.modules.lock().unwrap_or_else(|p| p.into_inner());
        let cached = lock().get(key).cloned();
        let m = match cached {
            Some(m) => m,
            None => {
                // Compiled without holding the cache, so that threads compile different
                // modules at once; a module two threads compiled together is kept once.
                let ptx = compile_with(module, sources, self.arch, options)?;
                let m = self.ctx.load_module(ptx).map_err(cuda_err(format!("loading {key}")))?;
                lock().entry(key.to_string()).or_insert(m).clone()
            }
        };
        m.load_function(function).map_err(cuda_err(format!("finding kernel {function}")))
    }

    /// A zero-filled buffer of `len` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let slice = self
            .stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(cuda_err(format!("allocating {len} elements")))?;
        Ok(self.track(slice))
    }

    /// A buffer of `len` elements whose contents are undefined until a kernel writes them
    /// (for workspaces that a product with `beta = 0` fills completely: no memset).
    pub fn uninit_f32(&self, len: usize) -> Result<DeviceBuffer<f32>> {
        self.uninit(len)
    }

    /// [`Gpu::uninit_f32`] for any plain element type (e.g. `u16` holding bf16 bits).
    pub fn uninit<T: DeviceRepr>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        // SAFETY: the element types used here (f32, u16) accept any bit pattern; callers
        // write before they read.
        let slice = unsafe { self.stream.alloc::<T>(len.max(1)) }
            .map_err(cuda_err(format!("allocating {len} elements")))?;
        Ok(self.track(slice))
    }

    /// The compute capability as one number: 90 for sm_90, 100 for sm_100.
    pub fn compute_capability(&self) -> u32 {
        self.arch.trim_start_matches("sm_").parse().unwrap_or(0)
    }

    /// A copy of `host` on the device.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        let slice = if host.is_empty() {
            // SAFETY: a one-element placeholder that no kernel reads (every length is 0).
            unsafe { self.stream.alloc::<T>(1) }
        } else {
            self.stream.clone_htod(host)
        }
        .map_err(cuda_err("copying to the device"))?;
        Ok(self.track(slice))
    }

    /// A copy of an array on the device, in row-major order.
    pub fn upload_array<T: DeviceRepr + Clone, D: Dimension>(
        &self,
        a: ArrayView<'_, T, D>,
    ) -> Result<DeviceBuffer<T>> {
        let standard = a.as_standard_layout();
        self.upload(standard.as_slice().expect("standard layout is contiguous"))
    }

    /// The buffer's contents on the host.
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        buf: &DeviceBuffer<T>,
    ) -> Result<Vec<T>> {
        let mut v = self.stream.clone_dtoh(&buf.slice).map_err(cuda_err("copying to the host"))?;
        v.truncate(buf.len);
        Ok(v)
    }

    /// The buffer's contents as a row-major array of shape `dims`.
    pub fn download_array<T, Sh>(
        &self,
        buf: &DeviceBuffer<T>,
        dims: Sh,
    ) -> Result<Array<T, Sh::Dim>>
    where
        T: DeviceRepr + Default + Clone,
        Sh: IntoDimension,
    {
        let v = self.download(buf)?;
        Ok(Array::from_shape_vec(dims.into_dimension(), v).expect("the buffer holds the array"))
    }

    /// The raw device address of a buffer, for kernel arguments and argument structs.
    pub fn ptr<T>(&self, buf: &DeviceBuffer<T>) -> u64 {
        let (ptr, _sync) = buf.slice.device_ptr(&self.stream);
        ptr
    }

    /// The device's copy bandwidth: bytes read plus written per second by a device-to-device
    /// copy of `bytes`, the best of five (the ceiling a memory-bound kernel is held to).
    pub fn copy_bandwidth(&self, bytes: usize) -> Result<f64> {
        let n = bytes / 4;
        let src = self.zeros::<f32>(n)?;
        let mut dst = self.zeros::<f32>(n)?;
        let mut best = 0.0f64;
        for _ in 0..6 {
            let t = Timer::start(self)?;
            self.stream
                .memcpy_dtod(&src.slice, &mut dst.slice)
                .map_err(cuda_err("copying on the device"))?;
            let ms = t.stop(self)?;
            best = best.max(2.0 * (4 * n) as f64 / (ms * 1e-3));
        }
        Ok(best)
    }

    /// Copies `src` to the device address `dst` on this stream (a caller's tensor of the same
    /// size and type).
    ///
    /// # Safety
    /// `dst` must address `src.len()` elements of `T` in this context, live until the stream
    /// reaches the copy.
    pub unsafe fn copy_to<T>(&self, src: &DeviceBuffer<T>, dst: u64) -> Result<()> {
        let bytes = src.len * size_of::<T>();
        self.bind().map_err(cuda_err("binding the context"))?;
        // SAFETY: src is this library's live buffer; the caller vouches for dst
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst,
                self.ptr(src),
                bytes,
                self.stream.cu_stream(),
            )
        }
        .map_err(cuda_err("copying on the device"))
    }

    /// Orders this library's stream after the work queued so far on `foreign`, a stream of
    /// the same context (PyTorch's current stream, say), with an event: no host wait.
    ///
    /// # Safety
    /// `foreign` must be a live `CUstream` of this context (0: the legacy default stream).
    pub unsafe fn wait_for(&self, foreign: u64) -> Result<()> {
        self.bind().map_err(cuda_err("binding the context"))?;
        // SAFETY: the caller vouches for foreign; ours lives as long as self
        unsafe { order(foreign as cudarc::driver::sys::CUstream, self.stream.cu_stream()) }
    }

    /// Orders `foreign` after the work queued so far on this library's stream (the results
    /// of a call made for its owner).
    ///
    /// # Safety
    /// As [`Gpu::wait_for`].
    pub unsafe fn make_wait(&self, foreign: u64) -> Result<()> {
        self.bind().map_err(cuda_err("binding the context"))?;
        // SAFETY: as wait_for
        unsafe { order(self.stream.cu_stream(), foreign as cudarc::driver::sys::CUstream) }
    }

    /// Waits for every launch so far; reports an asynchronous kernel error, if any.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("running the kernels"))
    }

    /// The driver's (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(cuda_err("reading the free memory"))
    }

    /// Bytes held now by [`DeviceBuffer`]s.
    pub fn live_bytes(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    fn track<T>(&self, slice: CudaSlice<T>) -> DeviceBuffer<T> {
        let bytes = slice.num_bytes();
        let now = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        DeviceBuffer { len: slice.len(), slice, bytes }
    }
}

/// Makes `after` wait for the work queued so far on `before` (a no-op where they are one
/// stream): an event recorded on one and waited for on the other, released at once (the
/// driver keeps it until the wait is done).
///
/// # Safety
/// Both must be live streams of the current context.
unsafe fn order(
    before: cudarc::driver::sys::CUstream,
    after: cudarc::driver::sys::CUstream,
) -> Result<()> {
    use cudarc::driver::result::{event, stream};
    if before == after {
        return Ok(());
    }
    let err = || cuda_err("ordering two streams");
    let ev = event::create(CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(err())?;
    // SAFETY: ev was just created; the caller vouches for the streams
    unsafe {
        event::record(ev, before).map_err(err())?;
        stream::wait_event(
            after,
            ev,
            cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
        )
        .map_err(err())?;
        event::destroy(ev).map_err(err())
    }
}

/// Device memory of `len` elements, counted while it lives.
#[derive(Debug)]
pub struct DeviceBuffer<T> {
    slice: CudaSlice<T>,
    len: usize,
    bytes: usize,
}

impl<T> DeviceBuffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if let Some(Ok(gpu)) = GPU.get() {
            gpu.live.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// The peak device bytes allocated through [`DeviceBuffer`] since [`DevicePeak::start`],
/// above what was live then (inputs already uploaded are not counted).
#[derive(Debug)]
pub struct DevicePeak {
    base: usize,
}

impl DevicePeak {
    pub fn start(gpu: &Gpu) -> Self {
        let base = gpu.live.load(Ordering::Relaxed);
        gpu.peak.store(base, Ordering::Relaxed);
        Self { base }
    }

    pub fn peak(&self, gpu: &Gpu) -> u64 {
        gpu.peak.load(Ordering::Relaxed).saturating_sub(self.base) as u64
    }
}

/// Device time between two CUDA events.
#[derive(Debug)]
pub struct Timer {
    start: CudaEvent,
}

impl Timer {
    /// Records the start event on the stream.
    pub fn start(gpu: &Gpu) -> Result<Self> {
        let start = gpu
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err("recording an event"))?;
        Ok(Self { start })
    }

    /// Records the stop event, waits for it and returns the milliseconds between the two.
    pub fn stop(self, gpu: &Gpu) -> Result<f64> {
        let end = gpu
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err("recording an event"))?;
        end.synchronize().map_err(cuda_err("running the kernels"))?;
        let ms = self.start.elapsed_ms(&end).map_err(cuda_err("reading an event"))?;
        Ok(f64::from(ms))
    }
}

/// Whether NVRTC, the CUDA runtime compiler, can be loaded (it compiles without a device).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to load the shared library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles CUDA source (the `sources` concatenated) to PTX for `arch` (e.g. "sm_90") with
/// NVRTC. Needs libnvrtc but no device, so kernels can be checked on any machine that has it.
pub fn compile(module: &str, sources: &[&str], arch: &'static str) -> Result<cudarc::nvrtc::Ptx> {
    compile_with(module, sources, arch, &[])
}

/// [`compile`] with extra NVRTC options (e.g. `-DNAME=VALUE`).
pub fn compile_with(
    module: &str,
    sources: &[&str],
    arch: &'static str,
    options: &[String],
) -> Result<cudarc::nvrtc::Ptx> {
    if !nvrtc_available() {
        return Err(AttnError::NoCudaDevice {
            reason: "the CUDA runtime compiler (libnvrtc) is not installed".into(),
        });
    }
    let opts = CompileOptions {
        arch: Some(arch),
        options: ["--std=c++17".to_string(), "--generate-line-info".to_string()]
            .into_iter()
            .chain(options.iter().cloned())
            .collect(),
        name: Some(format!("{module}.cu")),
        ..Default::default()
    };
    compile_ptx_with_opts(sources.concat(), opts).map_err(|e| AttnError::Cuda {
        context: format!("compiling {module}.cu"),
        message: e.to_string(),
    })
}

/// A launch of `grid_dim` blocks of `threads` threads, no dynamic shared memory.
pub fn grid(grid_dim: (u32, u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim, block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Grid size for `n` items in blocks of `block` threads.
pub fn blocks_for(n: usize, block: u32) -> u32 {
    n.div_ceil(block as usize).max(1) as u32
}
