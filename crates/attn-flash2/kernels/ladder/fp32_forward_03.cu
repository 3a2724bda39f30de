// Ladder step 3 of the fp32 forward (parent: step 2): K_j and V_j by cp.async into
// separate buffers, the block waiting for K_j only and computing S while V_j arrives; base-2
// exponentials. Its body is the shipped CUDA-core forward (flash2.cu, compiled before this
// file), here in its first configuration: 4 rows a thread, consecutive output columns, no
// register cap.
// It gained most at d = 64: the exposed global-memory latency had been the limit.
// What it measured, with machine and date: the book's chapter "FlashAttention on the GPU" and
// notes/gpu.md.

#define FP32_LADDER_KERNELS(D)                                                             \
    extern "C" __global__ void __launch_bounds__(NT)                                       \
        flash2_forward_v3_d##D(FlashArgs a, ScoreMods m, Dropout dr) {                     \
        flash_forward_v3<D, false, 4>(a, m, dr);                                                        \
    }
FP32_LADDER_KERNELS(32)
FP32_LADDER_KERNELS(64)
FP32_LADDER_KERNELS(96)
FP32_LADDER_KERNELS(128)
