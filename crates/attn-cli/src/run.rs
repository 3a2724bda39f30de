//! `attn run`: one stage on the user's own tensors.

use std::path::PathBuf;
use std::time::Instant;

use attn::core::memory::parse_bytes;
use attn::core::varlen::{self, KvCache, SeqLens};
use attn::flash2::tc;
use attn::{AttnError, Device, Inputs, Mask, Options, Stage};
use clap::{Args, ValueEnum};
use ndarray::{Array2, Array4, Ix2};

use crate::CliError;
use crate::npy::{Outputs, read_bhnd, read_bool, read_f32, read_int, read_int_vec, to_rank4};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

/// The element type the stage computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    /// bfloat16 on the tensor cores (flash2 on cuda, forward and backward).
    Bf16,
    /// float16 on the tensor cores (flash2 on cuda, forward and backward).
    F16,
}

impl DtypeArg {
    /// `a` as this type holds it: rounded to bf16 / fp16 and widened back (exactly) to f32.
    /// How the stage names and `--dtype` spell it.
    pub fn name(self) -> &'static str {
        match self {
            DtypeArg::F32 => "f32",
            DtypeArg::Bf16 => "bf16",
            DtypeArg::F16 => "f16",
        }
    }

    pub fn round(self, a: Array4<f32>) -> Array4<f32> {
        match self {
            DtypeArg::F32 => a,
            DtypeArg::Bf16 => tc::widen(tc::round::<tc::bf16, _>(a.view()).view()),
            DtypeArg::F16 => tc::widen(tc::round::<tc::f16, _>(a.view()).view()),
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The stage to run (default: the fastest, flash2).
    #[arg(long, default_value = attn::DEFAULT_STAGE, value_parser = clap::builder::PossibleValuesParser::new(attn::stage_names()))]
    pub algo: String,
    /// Where to run it.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Ranks of the ring (--algo ring): the sequence's chunks spread over this many ranks
    /// (threads; default 4 on the CPU, the devices the driver sees on CUDA).
    #[arg(long)]
    pub ranks: Option<usize>,
    /// Queries: float32 .npy [batch, heads, n_q, head_dim].
    #[arg(long)]
    pub q: PathBuf,
    /// Keys: float32 .npy [batch, kv_heads, n_k, head_dim] (kv_heads divides heads).
    #[arg(long)]
    pub k: PathBuf,
    /// Values: float32 .npy, the shape of the keys.
    #[arg(long)]
    pub v: PathBuf,
    /// Boolean mask (true = keep): bool .npy [batch, n_k] (key padding) or 4-D
    /// broadcastable to [batch, heads, n_q, n_k].
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Additive bias: float32 .npy broadcastable to [batch, heads, n_q, n_k]; -inf masks.
    #[arg(long)]
    pub bias: Option<PathBuf>,
    /// Hide key j from query i when j > i + n_k - n_q (bottom-right alignment).
    #[arg(long)]
    pub causal: bool,
    /// Sliding window LEFT,RIGHT: query i keeps keys i + n_k - n_q - LEFT ..= i + n_k - n_q
    /// + RIGHT; -1 leaves a side unbounded (e.g. --window 4096,0).
    #[arg(long, allow_hyphen_values = true)]
    pub window: Option<String>,
    /// Logit soft-capping: each scaled score s becomes C * tanh(s / C); C > 0.
    #[arg(long, allow_negative_numbers = true)]
    pub softcap: Option<f32>,
    /// ALiBi slopes: float32 .npy [heads] or [batch, heads]; adds -slope * |i + n_k - n_q - j|.
    #[arg(long)]
    pub alibi: Option<PathBuf>,
    /// Score scale (default 1/sqrt(head_dim)).
    #[arg(long, allow_negative_numbers = true)]
    pub scale: Option<f32>,
    /// Dropout probability on the attention weights, in [0, 1).
    #[arg(long, allow_negative_numbers = true)]
    pub dropout: Option<f32>,
    /// Dropout seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Query rows per block (tiled stages).
    #[arg(long)]
    pub q_block: Option<usize>,
    /// Key/value rows per block (tiled stages).
    #[arg(long)]
    pub k_block: Option<usize>,
    /// On-chip memory ("SRAM") the tiled stages size their blocks for, in f32 elements (the
    /// FlashAttention paper's M; K/M suffixes allowed, e.g. 64K).
    #[arg(long)]
    pub sram: Option<String>,
    /// Largest workspace the stage may allocate (bytes, or with K/M/G); default: the
    /// machine's available memory.
    #[arg(long)]
    pub memory_limit: Option<String>,
    /// Bitwise-reproducible gradients (the CUDA flash2 backward then computes dQ in a
    /// separate pass instead of by atomic additions; slower).
    #[arg(long)]
    pub deterministic: bool,
    /// Element type: f32, or bf16 / f16 on the tensor cores (--device cuda --algo flash2).
    /// The .npy files stay float32: q, k, v are rounded to the type, O is written widened
    /// (exactly) to float32, and --check compares with the reference on the rounded inputs.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Where to write the output, float32 .npy [batch, heads, n_q, head_dim].
    #[arg(long)]
    pub out: PathBuf,
    /// Where to write the log-sum-exp, float32 .npy [batch, heads, n_q].
    #[arg(long)]
    pub lse: Option<PathBuf>,
    /// Upstream gradient dO (float32 .npy, the output's shape): runs the backward too.
    #[arg(long, requires_all = ["dq", "dk", "dv"])]
    pub grad_out: Option<PathBuf>,
    /// Where to write dQ.
    #[arg(long, requires = "grad_out")]
    pub dq: Option<PathBuf>,
    /// Where to write dK.
    #[arg(long, requires = "grad_out")]
    pub dk: Option<PathBuf>,
    /// Where to write dV.
    #[arg(long, requires = "grad_out")]
    pub dv: Option<PathBuf>,
    /// Where to write dBias, the gradient of --bias in the bias's shape (needs --bias and
    /// --grad-out).
    #[arg(long)]
    pub dbias: Option<PathBuf>,
    /// A packed batch: the query offsets, int .npy [num_seqs + 1] from 0 to total_q. Q is
    /// then [1, heads, total_q, d], K/V [1, kv_heads, total_k, d], outputs and gradients
    /// packed the same way; each sequence attends only inside its spans.
    #[arg(long, requires = "cu_seqlens_k", conflicts_with = "cache_seqlens")]
    pub cu_seqlens_q: Option<PathBuf>,
    /// A packed batch: the key offsets, int .npy [num_seqs + 1] from 0 to total_k.
    #[arg(long, requires = "cu_seqlens_q")]
    pub cu_seqlens_k: Option<PathBuf>,
    /// Decoding from a KV cache: the valid keys of each batch row, int .npy [batch]; K/V are
    /// then the caches [batch, kv_heads, n_max, d] (forward only).
    #[arg(long)]
    pub cache_seqlens: Option<PathBuf>,
    /// A paged KV cache: page indices, int .npy [batch, max_blocks]; K/V are then page pools
    /// [num_pages, kv_heads, page_size, d] (needs --cache-seqlens).
    #[arg(long, requires = "cache_seqlens")]
    pub block_table: Option<PathBuf>,
    /// Also compute the float64 reference and print the errors against it.
    #[arg(long)]
    pub check: bool,
    /// Run the forward (and the backward) this many times and print the median time: the
    /// first call pays for the thread pool and fresh pages, later ones do not.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeats: u32,
}

/// The flag an error of the library is about.
fn flag_of(e: &AttnError) -> &'static str {
    match e {
        AttnError::Rank { arg, .. }
        | AttnError::EmptyAxis { arg, .. }
        | AttnError::ShapeMismatch { arg, .. }
        | AttnError::NonFinite { arg, .. } => match *arg {
            "q" => "--q",
            "k" => "--k",
            "v" => "--v",
            "mask" => "--mask",
            "bias" => "--bias",
            "alibi" => "--alibi",
            "d_out" => "--grad-out",
            _ => "--algo",
        },
        AttnError::ZeroBlockSize { arg } => match *arg {
            "q_block" => "--q-block",
            "k_block" => "--k-block",
            _ => "--sram",
        },
        AttnError::HeadsNotDivisible { .. } => "--k",
        AttnError::InvalidBias { .. } => "--bias",
        AttnError::InvalidScale(_) => "--scale",
        AttnError::ScoreOverflow { .. } => "--q",
        AttnError::InvalidDropout(_) => "--dropout",
        AttnError::InvalidWindow { .. } => "--window",
        AttnError::InvalidSoftcap(_) => "--softcap",
        AttnError::BiasGradWithoutBias => "--dbias",
        AttnError::UnsupportedHeadDim { .. }
        | AttnError::UnsupportedDevice { .. }
        | AttnError::NoCudaDevice { .. }
        | AttnError::Cuda { .. } => "--device",
        AttnError::WorkspaceTooLarge { .. } => "--algo",
        AttnError::InvalidLengths { arg, .. } => match *arg {
            "cu_seqlens_q" => "--cu-seqlens-q",
            "cu_seqlens_k" => "--cu-seqlens-k",
            "block_table" => "--block-table",
            _ => "--cache-seqlens",
        },
        AttnError::Unsupported { what, .. } => match *what {
            "dropout" => "--dropout",
            "gradients" => "--grad-out",
            _ => "--dtype",
        },
    }
}

pub(crate) fn lib_error(e: AttnError) -> CliError {
    CliError::input(flag_of(&e), e)
}

/// The mask file as the library's [`Mask`]: 2-D is key padding, 4-D is broadcastable.
enum MaskData {
    KeyPadding(Array2<bool>),
    Full(Array4<bool>),
}

/// `--window LEFT,RIGHT` as two integers (the library checks that each is at least -1).
pub fn parse_window(s: &str) -> Result<attn::Window, CliError> {
    let sides: Vec<_> = s.split(',').map(|x| x.trim().parse::<i64>()).collect();
    match sides[..] {
        [Ok(left), Ok(right)] => Ok(attn::Window::new(left, right)),
        _ => Err(CliError::input(
            "--window",
            format!("'{s}' is not LEFT,RIGHT (two integers, -1 for unbounded, e.g. 4096,0)"),
        )),
    }
}

/// `--alibi`: slopes [heads] (as [1, heads]) or [batch, heads].
fn read_alibi(path: &std::path::Path) -> Result<Array2<f32>, CliError> {
    let a = read_f32("--alibi", path)?;
    let shape = a.shape().to_vec();
    match shape[..] {
        [heads] => Ok(a.into_shape_with_order((1, heads)).expect("one axis")),
        [_, _] => Ok(a.into_dimensionality::<Ix2>().expect("rank checked")),
        _ => Err(CliError::input(
            "--alibi",
            format!(
                "{} has shape {shape:?}; ALiBi slopes are [heads] or [batch, heads]",
                path.display()
            ),
        )),
    }
}

fn read_mask(path: &std::path::Path) -> Result<MaskData, CliError> {
    let m = read_bool("--mask", path)?;
    match m.ndim() {
        2 => Ok(MaskData::KeyPadding(m.into_dimensionality::<Ix2>().expect("rank checked"))),
        4 => Ok(MaskData::Full(to_rank4("--mask", m, "")?)),
        _ => Err(CliError::input(
            "--mask",
            format!(
                "{} has shape {:?}; a mask is [batch, n_k] (key padding) or 4-D broadcastable to [batch, heads, n_q, n_k]",
                path.display(),
                m.shape()
            ),
        )),
    }
}

pub fn run(args: &RunArgs) -> Result<(), CliError> {
    let device = match args.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::Cuda,
    };
    if device == Device::Cuda {
        attn::cuda::gpu().map_err(|e| CliError::input("--device", e))?;
    }
    let stage: &dyn Stage = attn::stage(&args.algo, device).ok_or_else(|| {
        CliError::input(
            "--device",
            format!(
                "this build has no {device} variant of '{}' yet (GPU: naive, chunked, flash1, flash2, ring); use --device cpu or another --algo",
                args.algo
            ),
        )
    })?;
    let (ring_cpu, ring_cuda);
    let ranks = match (args.ranks, device) {
        // on CUDA the ring's ranks default to the devices the driver sees
        (None, Device::Cuda) if args.algo == attn::ring::cpu::NAME => {
            attn::cuda::gpu().ok().map(|g| g.devices())
        }
        (r, _) => r,
    };
    let stage: &dyn Stage = match ranks {
        None => stage,
        Some(_) if args.algo != attn::ring::cpu::NAME => {
            return Err(CliError::input(
                "--ranks",
                "--ranks is the ring's: use it with --algo ring",
            ));
        }
        Some(0) => return Err(CliError::input("--ranks", "the ring needs at least 1 rank")),
        Some(n) if device == Device::Cuda => {
            ring_cuda = attn::ring::RingCuda::new(n);
            &ring_cuda
        }
        Some(n) => {
            ring_cpu = attn::ring::RingCpu::new(n);
            &ring_cpu
        }
    };
    let memory_limit = args
        .memory_limit
        .as_deref()
        .map(|s| {
            parse_bytes(s).ok_or_else(|| {
                CliError::input(
                    "--memory-limit",
                    format!("'{s}' is not a size (e.g. 16G, 512M, 1000000)"),
                )
            })
        })
        .transpose()?;
    let sram = args
        .sram
        .as_deref()
        .map(|s| match parse_bytes(s) {
            Some(n) if n > 0 => Ok(n as usize),
            _ => Err(CliError::input(
                "--sram",
                format!("'{s}' is not a positive element count (e.g. 65536 or 64K)"),
            )),
        })
        .transpose()?;
    if args.dbias.is_some() && (args.bias.is_none() || args.grad_out.is_none()) {
        return Err(CliError::input(
            "--dbias",
            "dBias is the gradient of the bias: it needs --bias and --grad-out (with --dq, --dk, --dv)",
        ));
    }
    let opts = Options {
        sram,
        scale: args.scale,
        causal: args.causal,
        dropout: args.dropout.map(|p| attn::Dropout::new(p, args.seed)),
        q_block: args.q_block,
        k_block: args.k_block,
        memory_limit,
        deterministic: args.deterministic,
        window: args.window.as_deref().map(parse_window).transpose()?,
        softcap: args.softcap,
        bias_grad: args.dbias.is_some(),
        placement: None,
    };

    // Reserve every output first: a bad path fails before any work is done.
    let mut outputs = Outputs::new();
    outputs.reserve("--out", &args.out)?;
    if let Some(p) = &args.lse {
        outputs.reserve("--lse", p)?;
    }
    if args.grad_out.is_some() {
        for (flag, p) in [("--dq", &args.dq), ("--dk", &args.dk), ("--dv", &args.dv)] {
            outputs.reserve(flag, p.as_ref().expect("clap requires all three"))?;
        }
        if let Some(p) = &args.dbias {
            outputs.reserve("--dbias", p)?;
        }
    }

    if args.dtype != DtypeArg::F32 && (device != Device::Cuda || args.algo != "flash2") {
        return Err(CliError::input(
            "--dtype",
            "bf16 and f16 run on the tensor cores: use --device cuda --algo flash2, or --dtype f32",
        ));
    }
    // bf16 / f16: every later step (the stage, the reference of --check) sees the rounded values.
    let q = args.dtype.round(read_bhnd("--q", &args.q)?);
    let k = args.dtype.round(read_bhnd("--k", &args.k)?);
    let v = args.dtype.round(read_bhnd("--v", &args.v)?);
    let mask = args.mask.as_deref().map(read_mask).transpose()?;
    // the bias file's own shape, which --dbias is written in
    let mut bias_file_shape = Vec::new();
    let bias = args
        .bias
        .as_deref()
        .map(|p| {
            let b = read_f32("--bias", p)?;
            bias_file_shape = b.shape().to_vec();
            to_rank4(
                "--bias",
                b,
                "a bias has at most 4 axes, broadcastable to [batch, heads, n_q, n_k]",
            )
        })
        .transpose()?;
    let alibi = args.alibi.as_deref().map(read_alibi).transpose()?;
    let d_out = args
        .grad_out
        .as_deref()
        .map(|p| read_bhnd("--grad-out", p).map(|d| args.dtype.round(d)))
        .transpose()?;

    let mut inputs = Inputs::new(q.view(), k.view(), v.view());
    match &mask {
        Some(MaskData::KeyPadding(m)) => inputs = inputs.with_mask(Mask::KeyPadding(m.view())),
        Some(MaskData::Full(m)) => inputs = inputs.with_mask(Mask::Full(m.view())),
        None => {}
    }
    if let Some(b) = &bias {
        inputs = inputs.with_bias(b.view());
    }
    if let Some(a) = &alibi {
        inputs = inputs.with_alibi(a.view());
    }

    // The layout: one batch, a packed batch, or a KV cache (contiguous or paged).
    let table = args.block_table.as_deref().map(read_block_table).transpose()?;
    let layout = Layout::read(args, &q, &k, table.as_ref())?;
    if matches!(layout, Layout::Cached(_)) && args.grad_out.is_some() {
        return Err(CliError::input(
            "--grad-out",
            "a KV-cache call (--cache-seqlens) is inference: it has no backward; drop --grad-out",
        ));
    }

    let dtype = args.dtype;
    let forward = |i: &Inputs<'_>, o: &Options| -> attn::Result<attn::Forward> {
        let version = tc::forward_version();
        match dtype {
            DtypeArg::F32 => stage.forward(i, o),
            DtypeArg::Bf16 => tc::forward_rounded::<tc::bf16>(i, o, version).map(|f| f.0),
            DtypeArg::F16 => tc::forward_rounded::<tc::f16>(i, o, version).map(|f| f.0),
        }
    };
    let backward = |i: &Inputs<'_>,
                    o: &Options,
                    f: &attn::Forward,
                    d: ndarray::ArrayView4<'_, f32>|
     -> attn::Result<attn::Grads> {
        let version = tc::backward_version();
        match dtype {
            DtypeArg::F32 => stage.backward(i, o, f, d),
            DtypeArg::Bf16 => tc::backward_rounded::<tc::bf16>(i, o, f, d, version).map(|g| g.0),
            DtypeArg::F16 => tc::backward_rounded::<tc::f16>(i, o, f, d, version).map(|g| g.0),
        }
    };

    let run_forward = || match &layout {
        Layout::Plain => forward(&inputs, &opts),
        // a packed batch: in f32 the stage's own packed path (FlashAttention-2's on the CPU:
        // every sequence in one pass); in 16 bits (flash2 on CUDA) one launch of the tensor
        // cores over every sequence's tiles
        Layout::Packed(seqs) => match dtype {
            DtypeArg::F32 => stage.forward_packed(seqs, &inputs, &opts),
            DtypeArg::Bf16 => {
                tc::forward_packed_rounded::<tc::bf16>(seqs, &inputs, &opts).map(|f| f.0)
            }
            DtypeArg::F16 => {
                tc::forward_packed_rounded::<tc::f16>(seqs, &inputs, &opts).map(|f| f.0)
            }
        },
        // on the GPU, FlashAttention-2 decodes with its dedicated kernel (split-KV)
        Layout::Cached(cache) if device == Device::Cuda && args.algo == "flash2" => {
            decode_on_gpu(cache, &inputs, &opts, dtype)
        }
        // and elsewhere the stage's own cached call (flash2's: the GQA group as a tile's rows)
        Layout::Cached(cache) if dtype == DtypeArg::F32 => {
            stage.forward_cached(cache, &inputs, &opts, None)
        }
        Layout::Cached(cache) => varlen::forward_cached(cache, &inputs, &opts, forward),
    };
    let (fwd, fwd_time) = median_of(args.repeats, run_forward).map_err(lib_error)?;
    let grads = match &d_out {
        Some(d_out) => {
            let d_out = d_out.view();
            let run_backward = || match &layout {
                // as the forward: the stage's packed path, or the tensor cores' one launch
                Layout::Packed(seqs) => match dtype {
                    DtypeArg::F32 => stage.backward_packed(seqs, &inputs, &opts, &fwd, d_out),
                    DtypeArg::Bf16 => {
                        tc::backward_packed_rounded::<tc::bf16>(seqs, &inputs, &opts, &fwd, d_out)
                            .map(|g| g.0)
                    }
                    DtypeArg::F16 => {
                        tc::backward_packed_rounded::<tc::f16>(seqs, &inputs, &opts, &fwd, d_out)
                            .map(|g| g.0)
                    }
                },
                _ => backward(&inputs, &opts, &fwd, d_out),
            };
            Some(median_of(args.repeats, run_backward).map_err(lib_error)?)
        }
        None => None,
    };

    let mut summary = format!(
        "{} {} {}: {} causal={} forward {:.3} ms",
        stage.name(),
        stage.device(),
        args.dtype.to_possible_value().expect("no skipped variants").get_name(),
        attn::Shape::from_dims(q.dim(), k.dim()),
        opts.causal,
        fwd_time.as_secs_f64() * 1e3
    );
    if let Some((_, t)) = &grads {
        summary += &format!(", backward {:.3} ms", t.as_secs_f64() * 1e3);
    }
    if args.check {
        // a packed or cached call is checked as the one unpacked call it equals
        let unpacked = match &layout {
            Layout::Plain => None,
            Layout::Packed(seqs) => Some(seqs.unpacked(&inputs, &opts)),
            Layout::Cached(cache) => Some(cache.unpacked(&inputs, &opts)),
        };
        let (ref_inputs, ref_opts) = match &unpacked {
            None => (inputs, opts.clone()),
            Some(u) => (u.inputs(&inputs), Options { bias_grad: opts.bias_grad, ..u.opts.clone() }),
        };
        let reference = attn::core::reference::RefProblem::from_inputs(&ref_inputs, &ref_opts)
            .map_err(lib_error)?;
        let r = reference.forward();
        let e = attn::core::metrics::compare(fwd.out.view(), r.out.view());
        summary += &format!(
            "\n  error vs float64 reference: out {:.2e} (elementwise {:.2e})",
            e.normwise, e.elementwise
        );
        if let (Some((g, _)), Some(d_out)) = (&grads, &d_out) {
            let rg = reference.backward(&d_out.mapv(f64::from));
            for (name, x, r) in
                [("dq", &g.dq, &rg.dq), ("dk", &g.dk, &rg.dk), ("dv", &g.dv, &rg.dv)]
            {
                let e = attn::core::metrics::compare(x.view(), r.view());
                summary += &format!(", {name} {:.2e}", e.normwise);
            }
            if let (Some(x), Some(r)) = (&g.dbias, &rg.dbias) {
                let e = attn::core::metrics::compare(x.view(), r.view());
                summary += &format!(", dbias {:.2e}", e.normwise);
            }
        }
    }

    outputs.write("--out", &fwd.out)?;
    if args.lse.is_some() {
        outputs.write("--lse", &fwd.lse)?;
    }
    if let Some((g, _)) = &grads {
        outputs.write("--dq", &g.dq)?;
        outputs.write("--dk", &g.dk)?;
        outputs.write("--dv", &g.dv)?;
        if let Some(db) = &g.dbias {
            let db = db
                .view()
                .into_shape_with_order(bias_file_shape.as_slice())
                .expect("the bias's elements");
            outputs.write("--dbias", &db.to_owned())?;
        }
    }
    let written = outputs.commit()?;
    println!("{summary}");
    for p in written {
        println!("  wrote {}", p.display());
    }
    Ok(())
}

/// How the tensors of `attn run` are laid out.
/// A cached call on the decode kernel, in `dtype` (the inputs already rounded to it).
fn decode_on_gpu(
    cache: &KvCache<'_>,
    inputs: &Inputs<'_>,
    opts: &Options,
    dtype: DtypeArg,
) -> attn::Result<attn::Forward> {
    use attn::flash2::gpu::decode;
    match dtype {
        DtypeArg::F32 => decode::forward_cached(cache, inputs, opts, None),
        DtypeArg::Bf16 => decode::forward_cached_rounded::<tc::bf16>(cache, inputs, opts, None),
        DtypeArg::F16 => decode::forward_cached_rounded::<tc::f16>(cache, inputs, opts, None),
    }
}

enum Layout<'t> {
    Plain,
    Packed(SeqLens),
    Cached(KvCache<'t>),
}

/// `--block-table`: int [batch, max_blocks].
fn read_block_table(path: &std::path::Path) -> Result<Array2<i64>, CliError> {
    let t = read_int("--block-table", path)?;
    let shape = t.shape().to_vec();
    t.into_dimensionality::<Ix2>().map_err(|_| {
        CliError::input(
            "--block-table",
            format!("{} has shape {shape:?}; it must be [batch, max_blocks]", path.display()),
        )
    })
}

impl<'t> Layout<'t> {
    fn read(
        args: &RunArgs,
        q: &Array4<f32>,
        k: &Array4<f32>,
        table: Option<&'t Array2<i64>>,
    ) -> Result<Self, CliError> {
        if let (Some(cq), Some(ck)) = (&args.cu_seqlens_q, &args.cu_seqlens_k) {
            let what = "cu_seqlens are 1-D [num_seqs + 1]";
            let cq = read_int_vec("--cu-seqlens-q", cq, what)?;
            let ck = read_int_vec("--cu-seqlens-k", ck, what)?;
            return SeqLens::new(&cq, &ck, q.dim().2, k.dim().2)
                .map(Layout::Packed)
                .map_err(lib_error);
        }
        let Some(lens) = &args.cache_seqlens else {
            return Ok(Layout::Plain);
        };
        let lens = read_int_vec("--cache-seqlens", lens, "cache_seqlens is 1-D [batch]")?;
        let cache = match table {
            None => KvCache::contiguous(&lens),
            Some(t) => KvCache::paged(&lens, t.view()),
        }
        .map_err(lib_error)?;
        Ok(Layout::Cached(cache))
    }
}

/// `f` run `repeats` times: the last result and the median time.
fn median_of<R>(
    repeats: u32,
    mut f: impl FnMut() -> attn::Result<R>,
) -> attn::Result<(R, std::time::Duration)> {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..repeats {
        let start = Instant::now();
        last = Some(f()?);
        times.push(start.elapsed());
    }
    times.sort();
    Ok((last.expect("at least one run"), times[times.len() / 2]))
}
