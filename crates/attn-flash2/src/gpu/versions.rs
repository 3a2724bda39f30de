//! The one list of the GPU kernel versions of stage 4: what ships and the ladder that led to
//! it. `attn gpu-bench`, the GPU tests and the book's version tables read this table; nothing
//! else numbers versions.
//!
//! A version's kernels live in `kernels/` when the stage runs them (by default, or as the
//! fallback on GPUs before sm_80), and in `kernels/ladder/` otherwise: numbered standalone
//! steps, each one idea ahead of its parent, each opening with what it changes and why.
//! Version numbers are those under which the versions were measured (`notes/gpu.md`,
//! `notes/tensor-cores.md`); the steps that taught nothing were deleted, so the numbers have
//! gaps. A ladder step is compiled only when it is asked for.

use attn_cuda::{CONTRACT_HEADER, MMA, TILES};

/// Which kernel a track of versions computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Track {
    /// The forward on f32 inputs (CUDA cores, then the tensor cores by 3xTF32).
    Fp32Forward,
    /// The forward on bf16 / fp16 inputs, on the tensor cores.
    TcForward,
    /// The backward on bf16 / fp16 inputs, on the tensor cores.
    TcBackward,
    /// The backward on f32 inputs (CUDA cores, then the tensor cores by 3xTF32).
    Fp32Backward,
}

impl Track {
    /// Every track, in the book's order.
    pub const ALL: [Track; 4] =
        [Track::Fp32Forward, Track::Fp32Backward, Track::TcForward, Track::TcBackward];

    /// How the bench and the book name the track.
    pub fn name(self) -> &'static str {
        match self {
            Track::Fp32Forward => "fp32 forward",
            Track::TcForward => "tensor-core forward",
            Track::TcBackward => "tensor-core backward",
            Track::Fp32Backward => "fp32 backward",
        }
    }
}

/// Whether the stage runs a version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// What the stage runs (on sm_80 and later, the GPUs it is measured on).
    Default,
    /// What the stage runs on GPUs before sm_80, which lack the tensor-core instructions;
    /// `head_dims` says at which head dimensions (empty: all the others).
    Fallback { head_dims: &'static [usize] },
    /// A step of the ladder: compiled and run only when asked for.
    Ladder,
}

/// One kernel version.
#[derive(Clone, Copy, Debug)]
pub struct Version {
    pub track: Track,
    pub number: u32,
    /// The version it is one step ahead of.
    pub parent: Option<u32>,
    /// What it changes, in a line.
    pub change: &'static str,
    pub role: Role,
    /// The kernel file, relative to the crate's `kernels/`.
    pub file: &'static str,
}

macro_rules! kernels {
    ($($file:literal),* $(,)?) => {
        /// The source of a kernel file named in [`VERSIONS`] (relative to `kernels/`).
        pub fn file_source(file: &str) -> Option<&'static str> {
            match file {
                $($file => Some(include_str!(concat!("../../kernels/", $file))),)*
                _ => None,
            }
        }
    };
}

kernels!(
    "flash2.cu",
    "flash2_tf32.cu",
    "flash2_tf32_backward.cu",
    "tf32.cuh",
    "tc.cuh",
    "flash2_tc_forward.cu",
    "flash2_tc_backward.cu",
    "decode.cu",
    "ladder/fp32_forward_01.cu",
    "ladder/fp32_forward_02.cu",
    "ladder/fp32_forward_03.cu",
    "ladder/tc_forward_01.cu",
    "ladder/tc_forward_02.cu",
    "ladder/tc_forward_03.cu",
    "ladder/tc_forward_04.cu",
    "ladder/tc_forward_11.cu",
    "ladder/tc_backward_01.cu",
);

const fn v(
    track: Track,
    number: u32,
    parent: Option<u32>,
    role: Role,
    file: &'static str,
    change: &'static str,
) -> Version {
    Version { track, number, parent, change, role, file }
}

use Role::{Default, Fallback, Ladder};
use Track::{Fp32Backward, Fp32Forward, TcBackward, TcForward};

/// Every version of every track, in order.
pub const VERSIONS: &[Version] = &[
    // ANCHOR: registry
    v(
        Fp32Forward,
        1,
        None,
        Ladder,
        "ladder/fp32_forward_01.cu",
        "FlashAttention-2's loop order: a block per query tile, K_j and V_j streaming through shared memory, 4 × 4 scores a thread",
    ),
    v(
        Fp32Forward,
        2,
        Some(1),
        Ladder,
        "ladder/fp32_forward_02.cu",
        "16-byte shared-memory reads, consecutive output columns a thread",
    ),
    v(
        Fp32Forward,
        3,
        Some(2),
        Ladder,
        "ladder/fp32_forward_03.cu",
        "K_j and V_j by cp.async into separate buffers, S computed while V_j arrives; base-2 exponentials",
    ),
    v(
        Fp32Forward,
        5,
        Some(3),
        Fallback { head_dims: &[] },
        "flash2.cu",
        "at most 128 registers (two blocks a SM) and output columns spread 64 apart (no bank conflicts at d = 128)",
    ),
    v(
        Fp32Forward,
        7,
        Some(5),
        Fallback { head_dims: &[128] },
        "flash2.cu",
        "128 query rows a block (8 a thread) and K_j+1 prefetched into a second buffer",
    ),
    v(
        Fp32Forward,
        8,
        Some(7),
        Default,
        "flash2_tf32.cu",
        "the products on the tensor cores in 3xTF32 (three tf32 mma of big and small parts: f32 accuracy), 128 rows over 8 warps",
    ),
    v(
        Fp32Backward,
        1,
        None,
        Fallback { head_dims: &[] },
        "flash2.cu",
        "Algorithm 2 on the CUDA cores: a block per 64-key tile, 4 × 4 scores a thread, dQ by atomics or in a pass of its own over query tiles",
    ),
    v(
        Fp32Backward,
        2,
        Some(1),
        Default,
        "flash2_tf32_backward.cu",
        "the five products on the tensor cores in 3xTF32, the 16-bit backward's loop: 16 keys a warp, transposed accumulators, Q_i+1 and dO_i+1 a tile ahead; the separate dQ pass in 3xTF32 too",
    ),
    v(
        TcForward,
        1,
        None,
        Ladder,
        "ladder/tc_forward_01.cu",
        "mma.sync m16n8k16: 16 query rows a warp, P~ kept in the registers between the two products",
    ),
    v(
        TcForward,
        2,
        Some(1),
        Ladder,
        "ladder/tc_forward_02.cu",
        "every fragment by ldmatrix (.trans for V_j)",
    ),
    v(
        TcForward,
        3,
        Some(2),
        Ladder,
        "ladder/tc_forward_03.cu",
        "K_j+1, V_j+1 copied by cp.async into second buffers while tile j is computed",
    ),
    v(
        TcForward,
        4,
        Some(3),
        Ladder,
        "ladder/tc_forward_04.cu",
        "32 query rows a warp (128 a block): each K_j, V_j fragment read feeds two mma",
    ),
    v(
        TcForward,
        11,
        Some(4),
        Ladder,
        "ladder/tc_forward_11.cu",
        "a kernel without mask or bias, one barrier a tile, heaviest causal blocks first (and the folded bare exp2 of versions 5 and 8)",
    ),
    v(
        TcForward,
        14,
        Some(11),
        Default,
        "flash2_tc_forward.cu",
        "every address computed once: unrolled cp.async at fixed offsets, ldmatrix at precomputed shared addresses (3 blocks a SM at d = 64)",
    ),
    v(
        TcBackward,
        1,
        None,
        Ladder,
        "ladder/tc_backward_01.cu",
        "Algorithm 2 on mma.sync: a block per 64-key tile, transposed accumulators, dS^T through shared memory, dQ by f32 atomics",
    ),
    v(
        TcBackward,
        7,
        Some(1),
        Default,
        "flash2_tc_backward.cu",
        "Q_i+1, dO_i+1, lse and D a tile ahead, two floats an atomic, 8 warps at d = 128, the bare exp2, every address computed once",
    ),
    // ANCHOR_END: registry
];

/// The versions of `track`, in order.
pub fn versions(track: Track) -> impl Iterator<Item = &'static Version> {
    VERSIONS.iter().filter(move |v| v.track == track)
}

/// Version `number` of `track`, if it exists.
pub fn find(track: Track, number: u32) -> Option<&'static Version> {
    versions(track).find(|v| v.number == number)
}

/// The version the stage runs on `track` from sm_80 on.
pub fn default_version(track: Track) -> &'static Version {
    versions(track).find(|v| v.role == Role::Default).expect("every track has a default")
}

/// The version the stage runs on `track` at head dimension `d` on a GPU of
/// `compute_capability` (e.g. 90).
pub fn version_for(track: Track, d: usize, compute_capability: u32) -> &'static Version {
    if compute_capability >= 80 {
        return default_version(track);
    }
    let fallbacks = || {
        versions(track).filter_map(|v| match v.role {
            Role::Fallback { head_dims } => Some((v, head_dims)),
            _ => None,
        })
    };
    fallbacks()
        .find(|(_, dims)| dims.contains(&d))
        .or_else(|| fallbacks().find(|(_, dims)| dims.is_empty()))
        .map_or_else(|| default_version(track), |(v, _)| v)
}

/// The error for a version that does not exist, naming those that do.
pub fn unknown(track: Track, number: u32) -> attn_core::AttnError {
    let known: Vec<u32> = versions(track).map(|v| v.number).collect();
    attn_core::AttnError::Cuda {
        context: "choosing a kernel version".into(),
        message: format!("no {} version {number}; there are {known:?}", track.name()),
    }
}

impl Version {
    /// The sources NVRTC compiles for this version, in order: the shared headers, then the
    /// stage's kernels (a ladder step that reuses a shipped body comes after that body).
    pub fn sources(&self) -> Vec<&'static str> {
        let src = |f: &str| file_source(f).expect("every registered file is embedded");
        let mut s = vec![CONTRACT_HEADER, TILES];
        match self.track {
            Fp32Forward | Fp32Backward if self.is_tf32() => s.extend([MMA, src("tf32.cuh")]),
            Fp32Forward | Fp32Backward => {}
            TcForward | TcBackward => s.extend([MMA, src("tc.cuh")]),
        }
        if self.file == "ladder/fp32_forward_03.cu" {
            s.push(src("flash2.cu"));
        }
        s.push(src(self.file));
        s
    }

    /// Whether its products run on the tensor cores in 3xTF32 (sm_80 and later).
    pub fn is_tf32(&self) -> bool {
        matches!((self.track, self.number), (Fp32Forward, 8) | (Fp32Backward, 2))
    }

    /// The module name its kernels are cached under.
    pub fn module(&self) -> &'static str {
        self.file.trim_end_matches(".cu")
    }

    /// Whether the stage runs it (by default, or as a fallback before sm_80).
    pub fn ships(&self) -> bool {
        self.role != Role::Ladder
    }

    /// Whether a second kernel (`_mods`) takes the calls with a mask or bias, the first one
    /// being compiled without them (the 3xTF32 versions, tensor-core forward 11 on, backward
    /// 7 on).
    pub fn has_mods_kernel(&self) -> bool {
        match self.track {
            Fp32Forward | Fp32Backward => self.is_tf32(),
            TcForward => self.number >= 11,
            TcBackward => self.number >= 7,
        }
    }

    /// Whether twin kernels (`_cut`) take what the plain kernels have no registers to spare
    /// for at d = 128: in the shipped tensor-core forward, the calls whose scores a sliding
    /// window, the softcap or ALiBi change; in the shipped backwards (tensor-core and
    /// 3xTF32), the softcap without mask, bias or ALiBi (their plain kernels take the window,
    /// their `_mods` kernels the softcap too). Every other kernel takes them itself.
    pub fn has_cut_kernel(&self) -> bool {
        self.ships()
            && match self.track {
                TcForward | TcBackward => true,
                Fp32Backward => self.is_tf32(),
                Fp32Forward => false,
            }
    }

    /// [`Version::kernel_name`] for a call that needs the twin kernel when `cut`
    /// ([`Version::has_cut_kernel`]: a window, softcap or ALiBi in the forward, the softcap in
    /// a backward); a backward's `_mods` kernel has no twin.
    pub fn kernel_name_cut(&self, d: usize, with_mods: bool, cut: bool) -> String {
        let name = self.kernel_name(d, with_mods);
        let backward_mods = with_mods && self.track != TcForward;
        if cut && self.has_cut_kernel() && !backward_mods { format!("{name}_cut") } else { name }
    }

    /// The forward's kernel for a call with a mask or bias when `with_mods`, with a window,
    /// softcap or ALiBi when `cut`, with a softcap that fp16 can carry when `softcap`
    /// ([`cap_in_fp16`]): in the shipped tensor-core forward, that softcap without mask, bias
    /// or ALiBi has a kernel of its own (`_cap`, which softcaps the tiles inside the band in
    /// pairs of fp16); otherwise [`Version::kernel_name_cut`].
    pub fn forward_kernel_name(
        &self,
        d: usize,
        with_mods: bool,
        cut: bool,
        softcap: bool,
    ) -> String {
        if softcap && !with_mods && self.ships() && self.track == TcForward {
            format!("{}_cap", self.kernel_name(d, false))
        } else {
            self.kernel_name_cut(d, with_mods, cut)
        }
    }

    /// The name of the kernel to launch at head dimension `d`, for a call with a mask or bias
    /// when `with_mods` (the backward's with dQ by atomics). The CUDA-core fp32 kernels are
    /// compiled for every head dimension in one module (`_d{d}`); the others' modules for
    /// one, and a shipped tensor-core kernel is named after its track, a ladder step after
    /// its number.
    pub fn kernel_name(&self, d: usize, with_mods: bool) -> String {
        let mods = if with_mods && self.has_mods_kernel() { "_mods" } else { "" };
        match self.track {
            Fp32Forward if self.is_tf32() => format!("flash2_forward_v8{mods}"),
            Fp32Forward => format!("flash2_forward_v{}_d{d}", self.number),
            Fp32Backward if self.is_tf32() => format!("flash2_backward_v{}{mods}", self.number),
            Fp32Backward => format!("flash2_backward_kv_atomic_dq_d{d}"),
            TcForward | TcBackward => {
                let base = if self.track == TcForward {
                    "flash2_tc_forward"
                } else {
                    "flash2_tc_backward"
                };
                let number =
                    if self.ships() { String::new() } else { format!("_v{}", self.number) };
                format!("{base}{number}{mods}")
            }
        }
    }
}

/// Whether the `_cap` forward may take softcap `c` at scale `scale`: it multiplies each raw
/// score by scale / c in fp16, so a score beyond fp16's range (65 504) becomes ±∞; that is
/// exact only where its tanh rounds to ±1 in fp16 anyway, |scale / c| · 65 504 ≥ 8 (tanh(8)
/// is 1 − 2.3e-7, below fp16's last bit at 1). Softcaps larger than that (c above 723 at
/// scale 1/√128) run the `_cut` kernel, in f32.
pub fn cap_in_fp16(c: f32, scale: f32) -> bool {
    (scale / c).abs() * 65_504.0 >= 8.0
}

/// The versions of `track` as a markdown table (number, parent, what changed, whether the
/// stage runs it, its file): what the book includes (`book/src/versions/*.md`, checked by a
/// test to be this table) and what `attn versions` prints.
pub fn markdown_table(track: Track) -> String {
    let mut t = String::from(
        "| version | parent | what it changes | runs | file |\n| ---: | ---: | --- | --- | --- |\n",
    );
    for v in versions(track) {
        let parent = v.parent.map_or("—".to_string(), |p| p.to_string());
        let runs = match v.role {
            Role::Default => "by default".to_string(),
            Role::Fallback { head_dims: [] } => "before sm_80".to_string(),
            Role::Fallback { head_dims } => {
                let dims: Vec<String> = head_dims.iter().map(|d| format!("d = {d}")).collect();
                format!("before sm_80, {}", dims.join(", "))
            }
            Role::Ladder => "ladder".to_string(),
        };
        let file = format!("`kernels/{}`", v.file);
        t.push_str(&format!("| {} | {parent} | {} | {runs} | {file} |\n", v.number, v.change));
    }
    t
}

/// The file under `book/src/versions/` that holds `track`'s table.
pub fn book_table_file(track: Track) -> &'static str {
    match track {
        Track::Fp32Forward => "flash2-fp32-forward.md",
        Track::Fp32Backward => "flash2-fp32-backward.md",
        Track::TcForward => "flash2-tc-forward.md",
        Track::TcBackward => "flash2-tc-backward.md",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The book includes the registry's tables; they must be today's. Run with
    /// `ATTN_WRITE_VERSION_TABLES=1` to rewrite them after changing the registry.
    #[test]
    fn the_books_version_tables_are_the_registry() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../book/src/versions");
        for track in Track::ALL {
            let path = format!("{dir}/{}", book_table_file(track));
            let table = markdown_table(track);
            if std::env::var_os("ATTN_WRITE_VERSION_TABLES").is_some() {
                std::fs::create_dir_all(dir).unwrap();
                std::fs::write(&path, &table).unwrap();
            }
            let book = std::fs::read_to_string(&path).unwrap_or_default();
            assert_eq!(
                book, table,
                "{path} differs from the registry; ATTN_WRITE_VERSION_TABLES=1 rewrites it"
            );
        }
    }

    #[test]
    fn every_track_has_one_default_and_every_parent_exists() {
        for track in Track::ALL {
            let defaults = versions(track).filter(|v| v.role == Role::Default).count();
            assert_eq!(defaults, 1, "{track:?}");
            for v in versions(track) {
                if let Some(p) = v.parent {
                    assert!(find(track, p).is_some_and(|p| p.number < v.number), "{v:?}");
                }
                assert!(file_source(v.file).is_some(), "{v:?}");
                let shipped = !v.file.starts_with("ladder/");
                assert_eq!(
                    v.ships(),
                    shipped,
                    "{v:?}: kernels/ holds what ships, ladder/ the rest"
                );
            }
        }
        assert_eq!(default_version(Track::TcForward).number, 14);
        assert_eq!(default_version(Track::TcBackward).number, 7);
        assert_eq!(default_version(Track::Fp32Forward).number, 8);
        assert_eq!(default_version(Track::Fp32Backward).number, 2);
    }

    #[test]
    fn kernel_names_follow_the_files_that_define_them() {
        let fp32 = |n| find(Track::Fp32Forward, n).unwrap();
        assert_eq!(fp32(5).kernel_name(64, true), "flash2_forward_v5_d64");
        assert_eq!(fp32(8).kernel_name(64, true), "flash2_forward_v8_mods");
        let bwd = |n| find(Track::Fp32Backward, n).unwrap();
        assert_eq!(bwd(1).kernel_name(96, true), "flash2_backward_kv_atomic_dq_d96");
        assert_eq!(bwd(2).kernel_name(96, true), "flash2_backward_v2_mods");
        assert_eq!(bwd(2).kernel_name(32, false), "flash2_backward_v2");
        let tc = |t, n| find(t, n).unwrap();
        assert_eq!(tc(Track::TcForward, 4).kernel_name(128, true), "flash2_tc_forward_v4");
        assert_eq!(tc(Track::TcForward, 11).kernel_name(128, true), "flash2_tc_forward_v11_mods");
        assert_eq!(tc(Track::TcForward, 14).kernel_name(64, false), "flash2_tc_forward");
        let v14 = tc(Track::TcForward, 14);
        assert_eq!(v14.kernel_name_cut(64, true, true), "flash2_tc_forward_mods_cut");
        assert_eq!(v14.kernel_name_cut(64, false, false), "flash2_tc_forward");
        assert_eq!(v14.forward_kernel_name(64, false, true, true), "flash2_tc_forward_cap");
        assert_eq!(v14.forward_kernel_name(64, true, true, true), "flash2_tc_forward_mods_cut");
        assert_eq!(v14.forward_kernel_name(64, false, true, false), "flash2_tc_forward_cut");
        assert_eq!(
            tc(Track::TcForward, 11).kernel_name_cut(64, false, true),
            "flash2_tc_forward_v11"
        );
        assert_eq!(tc(Track::TcBackward, 7).kernel_name(64, true), "flash2_tc_backward_mods");
        assert_eq!(tc(Track::TcBackward, 1).kernel_name(64, true), "flash2_tc_backward_v1");
    }

    #[test]
    fn the_fp16_softcap_kernel_takes_caps_up_to_where_fp16_saturates_tanh() {
        let scale = 1.0 / 128f32.sqrt();
        assert!(cap_in_fp16(30.0, scale));
        assert!(cap_in_fp16(0.01, scale));
        assert!(cap_in_fp16(-700.0, -scale)); // the sign cancels in |scale / c|
        assert!(cap_in_fp16(723.0, scale) && !cap_in_fp16(724.0, scale));
        assert!(!cap_in_fp16(1e4, scale));
    }

    #[test]
    fn before_sm_80_the_fp32_kernels_fall_back_to_the_cuda_cores() {
        assert_eq!(version_for(Track::Fp32Forward, 64, 90).number, 8);
        assert_eq!(version_for(Track::Fp32Forward, 128, 75).number, 7);
        assert_eq!(version_for(Track::Fp32Forward, 64, 75).number, 5);
        assert_eq!(version_for(Track::Fp32Forward, 96, 70).number, 5);
        assert_eq!(version_for(Track::Fp32Backward, 64, 90).number, 2);
        assert_eq!(version_for(Track::Fp32Backward, 128, 75).number, 1);
    }

    #[test]
    fn every_kernel_file_in_the_crate_is_registered() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
        let mut files = Vec::new();
        for sub in ["", "ladder/"] {
            for e in std::fs::read_dir(format!("{dir}/{sub}")).unwrap() {
                let name = e.unwrap().file_name().into_string().unwrap();
                if name.ends_with(".cu") || name.ends_with(".cuh") {
                    files.push(format!("{sub}{name}"));
                }
            }
        }
        for f in &files {
            assert!(file_source(f).is_some(), "{f} is not embedded in the registry");
        }
        assert_eq!(files.len(), 17);
    }
}
