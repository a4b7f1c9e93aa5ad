// kvt_copy_segments(dsts, srcs, sizes, n): copies n segments, sizes[i] bytes from srcs[i]
// to dsts[i]; addresses are generic (device memory, peer or IPC-mapped device memory, or
// mapped pinned host memory); the three descriptor arrays usually live in mapped pinned
// host memory.
//
// kvt_copy_runs does the same from a call's planned runs (see below).
//
// A CTA of 256 threads (8 warps) takes 32 consecutive segments: one warp of it loads their
// descriptors with three coalesced reads into shared memory (a read of host memory crosses
// PCIe, so each is made once per CTA, not once per warp), then each warp copies 4 of them,
// its lanes striding over 16-byte words (8-byte words, or bytes, when the addresses or the
// size are not aligned so), loading several words before storing them. Grid-stride over
// groups of 32 segments.
//
// The source of copy_segments.ptx: `scripts/build-ptx.sh` on a machine with nvcc
// regenerates it (PTX ISA 7.0, sm_70, so that any driver from CUDA 11.0 on can JIT it).

#ifndef THREADS
#define THREADS 256
#endif
#ifndef PER_WARP
#define PER_WARP 4
#endif
#define WARPS (THREADS / 32)
#define PER_CTA (WARPS * PER_WARP)

typedef unsigned long long u64;

// Copies the group of up to PER_CTA segments whose descriptors the CTA put in shared memory.
__device__ __forceinline__ void copy_group(const u64* dst_of, const u64* src_of, const u64* size_of,
                                           u64 base, u64 n)
{
    const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (unsigned k = 0; k < PER_WARP; k++) {
        const unsigned i = warp * PER_WARP + k;
        if (base + i >= n) break;
        const u64 d = dst_of[i], s = src_of[i], size = size_of[i];
        if (((d | s | size) & 15) == 0) {
            const uint4* src = (const uint4*)s;
            uint4* dst = (uint4*)d;
            const u64 words = size >> 4;
            u64 j = lane;
            for (; j + 96 < words; j += 128) {
                uint4 a = src[j], b = src[j + 32], c = src[j + 64], e = src[j + 96];
                dst[j] = a; dst[j + 32] = b; dst[j + 64] = c; dst[j + 96] = e;
            }
            for (; j + 32 < words; j += 64) {
                uint4 a = src[j], b = src[j + 32];
                dst[j] = a; dst[j + 32] = b;
            }
            if (j < words) dst[j] = src[j];
        } else if (((d | s | size) & 7) == 0) {
            const u64* src = (const u64*)s;
            u64* dst = (u64*)d;
            const u64 words = size >> 3;
            u64 j = lane;
            for (; j + 32 < words; j += 64) {
                u64 a = src[j], b = src[j + 32];
                dst[j] = a; dst[j + 32] = b;
            }
            if (j < words) dst[j] = src[j];
        } else {
            const unsigned char* src = (const unsigned char*)s;
            unsigned char* dst = (unsigned char*)d;
            for (u64 j = lane; j < size; j += 32) dst[j] = src[j];
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
kvt_copy_segments(const u64* dsts, const u64* srcs, const u64* sizes, unsigned int n)
{
    __shared__ u64 dst_of[PER_CTA], src_of[PER_CTA], size_of[PER_CTA];
    for (u64 base = (u64)blockIdx.x * PER_CTA; base < n; base += (u64)gridDim.x * PER_CTA) {
        if (threadIdx.x < PER_CTA && base + threadIdx.x < n) {
            dst_of[threadIdx.x] = dsts[base + threadIdx.x];
            src_of[threadIdx.x] = srcs[base + threadIdx.x];
            size_of[threadIdx.x] = sizes[base + threadIdx.x];
        }
        __syncthreads();
        copy_group(dst_of, src_of, size_of, base, n);
        __syncthreads();
    }
}

// Where each kind (K, V, K-scale, V-scale) of a layer is: this side's region, the peer's,
// and the kind's block size.
struct Kinds {
    u64 local[4];
    u64 remote[4];
    u64 block_bytes[4];
};

// kvt_copy_runs(runs, nruns, kinds, k): the planned runs of one call (local block, remote
// block, blocks: three u32 each, 12 bytes a run, usually in mapped pinned host memory),
// copied for every kind: segment s is run s % nruns of kind s / nruns. A quarter of the
// descriptor bytes of kvt_copy_segments, and nothing per kind to write on the host.
extern "C" __global__ void __launch_bounds__(THREADS)
kvt_copy_runs(const unsigned* runs, unsigned int nruns, unsigned int kinds, Kinds k)
{
    __shared__ u64 dst_of[PER_CTA], src_of[PER_CTA], size_of[PER_CTA];
    const u64 n = (u64)nruns * kinds;
    for (u64 base = (u64)blockIdx.x * PER_CTA; base < n; base += (u64)gridDim.x * PER_CTA) {
        if (threadIdx.x < PER_CTA && base + threadIdx.x < n) {
            const u64 s = base + threadIdx.x;
            const unsigned kind = (unsigned)(s / nruns);
            const u64 r = s - (u64)kind * nruns;
            const u64 bytes = k.block_bytes[kind];
            src_of[threadIdx.x] = k.local[kind] + (u64)runs[3 * r] * bytes;
            dst_of[threadIdx.x] = k.remote[kind] + (u64)runs[3 * r + 1] * bytes;
            size_of[threadIdx.x] = (u64)runs[3 * r + 2] * bytes;
        }
        __syncthreads();
        copy_group(dst_of, src_of, size_of, base, n);
        __syncthreads();
    }
}
