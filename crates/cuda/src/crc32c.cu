// kvt_crc32c(chunks, n, total, partials, counter, out): the CRC-32C (Castagnoli, reflected
// polynomial 0x82F63B78, init and xorout 0xFFFFFFFF) of n chunks of memory as if they were
// one buffer, in list order; addresses are generic (device memory, peer or IPC-mapped
// device memory, or mapped pinned host memory).
//
// chunks: n pairs of u64 (address, position), usually in mapped pinned host memory; the
// position is the number of bytes before the chunk in the concatenation, so chunk c is
// (position of c+1, or total for the last) - (position of c) bytes long. The host cuts
// segments into chunks of at most a few KiB (crc32c.rs), so that many warps share a long
// segment and every chunk costs a warp about the same.
//
// The sum is linear over GF(2), which makes every chunk independent: with raw(M) the CRC
// of M from a zero register and no final xor,
//     raw(A || B) = raw(A) * x^(8|B|) mod P  xor  raw(B),
// so raw(all) = XOR over chunks of raw(chunk) * x^(8 * bytes after the chunk), and
//     crc(all) = raw(all) xor 0xFFFFFFFF * x^(8 * total) xor 0xFFFFFFFF.
// XOR does not care about order: each warp adds its chunks' terms, the CTA xors its warps'
// sums into partials[blockIdx.x], and the last CTA to finish (a ticket in *counter, reset
// for the next launch) xors the partials and writes the result to *out.
//
// Within a chunk, lane l of a warp sums the 16-byte units l, l+32, l+64, ... (coalesced
// 16-byte loads): s = s * x^4096 xor raw(unit) (4 + 16 table lookups in shared memory),
// so s ends as the raw CRC of its units spaced 512 bytes apart, and raw(chunk) = XOR over
// lanes of s * x^(128 * units after the lane's last one). A chunk's first and last unit
// may be partial (unaligned addresses, odd lengths): the missing bytes are read as zeros.
// Leading zeros do not change a raw CRC; trailing ones multiply it by x^8 each, which the
// chunk's factor takes back (x^-8 per byte, INV8 below).
//
// Polynomials are 32-bit words in the reflected order of the CRC register: bit 31 is x^0.
// The source of crc32c.ptx: `scripts/build-ptx.sh` regenerates it (with nvcc, or NVRTC).

#define CRC_THREADS 256
#define CRC_WARPS (CRC_THREADS / 32)
#define POLY 0x82F63B78u
#define ONE 0x80000000u
#define X4096 0x74c360a4u

typedef unsigned long long u64;
typedef unsigned int u32;

// x^(8 * 2^j) mod P, j = 0..63 (repeated squaring of x^8).
__constant__ u32 kvt_crc_p8[64] = {
    0x00800000, 0x00008000, 0x82f63b78, 0x6ea2d55c, 0x18b8ea18, 0x510ac59a, 0xb82be955, 0xb8fdb1e7,
    0x88e56f72, 0x74c360a4, 0xe4172b16, 0x0d65762a, 0x35d73a62, 0x28461564, 0xbf455269, 0xe2ea32dc,
    0xfe7740e6, 0xf946610b, 0x3c204f8f, 0x538586e3, 0x59726915, 0x734d5309, 0xbc1ac763, 0x7d0722cc,
    0xd289cabe, 0xe94ca9bc, 0x05b74f3f, 0xa51e1f42, 0x40000000, 0x20000000, 0x08000000, 0x00800000,
    0x00008000, 0x82f63b78, 0x6ea2d55c, 0x18b8ea18, 0x510ac59a, 0xb82be955, 0xb8fdb1e7, 0x88e56f72,
    0x74c360a4, 0xe4172b16, 0x0d65762a, 0x35d73a62, 0x28461564, 0xbf455269, 0xe2ea32dc, 0xfe7740e6,
    0xf946610b, 0x3c204f8f, 0x538586e3, 0x59726915, 0x734d5309, 0xbc1ac763, 0x7d0722cc, 0xd289cabe,
    0xe94ca9bc, 0x05b74f3f, 0xa51e1f42, 0x40000000, 0x20000000, 0x08000000, 0x00800000, 0x00008000};
// x^(-8z) mod P, z = 0..15.
__constant__ u32 kvt_crc_inv8[16] = {
    0x80000000, 0xfde39562, 0xbef0965e, 0xdd36fbfc, 0xd610d67e, 0xd16a78e5, 0xb241a332, 0x54d1fbb0,
    0xe67cce65, 0x5e3bd2d5, 0x28eef10f, 0x7c1c66a8, 0xb90cbfcd, 0x389a282b, 0x56022db8, 0x3e722b87};
// x^(128k) mod P, k = 0..31.
__constant__ u32 kvt_crc_lane[32] = {
    0x80000000, 0x18b8ea18, 0x510ac59a, 0xb2dea967, 0xb82be955, 0x36c41f1c, 0x19b29a35, 0xc9e90b9e,
    0xb8fdb1e7, 0xe55ef1f3, 0x1fe0b5c3, 0xe0553f1e, 0x18e4a304, 0x2b830011, 0x56993a31, 0x0246e2e6,
    0x88e56f72, 0x35490db3, 0x12b02f20, 0xea132ac3, 0x9030a49c, 0x7df9f615, 0xc1550ce8, 0xdf33d39d,
    0x67db2c4a, 0x1a4fce47, 0xf882f186, 0x41019701, 0xe744dcb2, 0x8203be83, 0xc6ddcb06, 0x993083f9};

struct Tables {
    u32 t[16][256];  // t[j][b]: raw CRC of byte b followed by j zero bytes
    u32 s[4][256];   // s[j][b]: (b << 8j) * x^4096
    u32 p8[64];
    u32 inv8[16];
    u32 lane[32];
};

// a * b mod P (bit by bit over a, from x^0 up; stops after a's last term).
__device__ __forceinline__ u32 mulmod(u32 a, u32 b)
{
    u32 p = 0;
    for (u32 m = ONE; m != 0; m >>= 1) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0) break;
        }
        b = (b >> 1) ^ ((b & 1) ? POLY : 0);
    }
    return p;
}

// x^(8e) mod P, computed by the whole warp (every lane gets it): lane j takes bits j and
// j + 32 of e, then the lanes multiply their terms together.
__device__ __forceinline__ u32 power8(const Tables& T, u64 e, u32 lane)
{
    u32 lo = ((e >> lane) & 1) ? T.p8[lane] : ONE;
    u32 hi = ((e >> (lane + 32)) & 1) ? T.p8[lane + 32] : ONE;
    u32 v = mulmod(hi, lo);
    for (int off = 16; off > 0; off >>= 1) v = mulmod(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

__device__ __forceinline__ u32 raw16(const Tables& T, uint4 w)
{
    return T.t[15][w.x & 255] ^ T.t[14][(w.x >> 8) & 255] ^ T.t[13][(w.x >> 16) & 255] ^ T.t[12][w.x >> 24]
         ^ T.t[11][w.y & 255] ^ T.t[10][(w.y >> 8) & 255] ^ T.t[9][(w.y >> 16) & 255] ^ T.t[8][w.y >> 24]
         ^ T.t[7][w.z & 255] ^ T.t[6][(w.z >> 8) & 255] ^ T.t[5][(w.z >> 16) & 255] ^ T.t[4][w.z >> 24]
         ^ T.t[3][w.w & 255] ^ T.t[2][(w.w >> 8) & 255] ^ T.t[1][(w.w >> 16) & 255] ^ T.t[0][w.w >> 24];
}

__device__ __forceinline__ u32 shift4096(const Tables& T, u32 s)
{
    return T.s[0][s & 255] ^ T.s[1][(s >> 8) & 255] ^ T.s[2][(s >> 16) & 255] ^ T.s[3][s >> 24];
}

// The 16-byte unit at aligned address ua, bytes outside [lo, hi) read as zeros (and not
// read at all).
__device__ __forceinline__ uint4 load_unit(u64 ua, u64 lo, u64 hi)
{
    if (ua >= lo && ua + 16 <= hi) return *(const uint4*)ua;
    u32 w[4] = {0, 0, 0, 0};
    for (u32 i = 0; i < 16; i++) {
        const u64 a = ua + i;
        if (a >= lo && a < hi) w[i >> 2] |= (u32)(*(const unsigned char*)a) << (8 * (i & 3));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// raw(chunk) * x^(8 * after) for the chunk of len bytes at addr, summed by one warp.
__device__ u32 chunk_term(const Tables& T, u64 addr, u64 len, u64 after, u32 lane)
{
    const u64 end_addr = addr + len;
    const u64 start = addr & ~15ull, end = (end_addr + 15) & ~15ull;
    const u64 units = (end - start) >> 4;
    const u32 pad = (u32)(end - end_addr);
    u32 s = 0;
    u64 i = lane;
    for (; i + 96 < units; i += 128) {
        const uint4 a = load_unit(start + (i << 4), addr, end_addr);
        const uint4 b = load_unit(start + ((i + 32) << 4), addr, end_addr);
        const uint4 c = load_unit(start + ((i + 64) << 4), addr, end_addr);
        const uint4 d = load_unit(start + ((i + 96) << 4), addr, end_addr);
        s = shift4096(T, s) ^ raw16(T, a);
        s = shift4096(T, s) ^ raw16(T, b);
        s = shift4096(T, s) ^ raw16(T, c);
        s = shift4096(T, s) ^ raw16(T, d);
    }
    for (; i < units; i += 32) s = shift4096(T, s) ^ raw16(T, load_unit(start + (i << 4), addr, end_addr));
    u32 r = 0;
    if (lane < units) {
        const u64 last = lane + ((units - 1 - lane) >> 5 << 5);
        r = mulmod(T.lane[units - 1 - last], s);
    }
    for (int off = 16; off > 0; off >>= 1) r ^= __shfl_xor_sync(0xffffffffu, r, off);
    // The zero padding after the chunk's last byte is taken back: x^(8 * (after - pad)).
    const u32 f = after >= pad ? power8(T, after - pad, lane) : T.inv8[pad - after];
    return mulmod(f, r);
}

extern "C" __global__ void __launch_bounds__(CRC_THREADS)
kvt_crc32c(const u64* chunks, unsigned int n, u64 total, u32* partials, u32* counter, u32* out)
{
    __shared__ Tables T;
    __shared__ u32 warp_sum[CRC_WARPS];
    __shared__ bool last;
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    {
        u32 c = tid;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ ((c & 1) ? POLY : 0);
        T.t[0][tid] = c;
    }
    if (tid < 64) T.p8[tid] = kvt_crc_p8[tid];
    if (tid < 16) T.inv8[tid] = kvt_crc_inv8[tid];
    if (tid < 32) T.lane[tid] = kvt_crc_lane[tid];
    for (int j = 0; j < 4; j++) T.s[j][tid] = mulmod(tid << (8 * j), X4096);
    __syncthreads();
    for (int j = 1; j < 16; j++) {
        const u32 v = T.t[j - 1][tid];
        T.t[j][tid] = (v >> 8) ^ T.t[0][v & 255];
        __syncthreads();
    }

    u32 acc = 0;
    const u64 stride = (u64)gridDim.x * CRC_WARPS;
    for (u64 c = (u64)blockIdx.x * CRC_WARPS + warp; c < n; c += stride) {
        const u64 addr = chunks[2 * c], pos = chunks[2 * c + 1];
        const u64 next = c + 1 < n ? chunks[2 * c + 3] : total;
        acc ^= chunk_term(T, addr, next - pos, total - next, lane);
    }
    if (lane == 0) warp_sum[warp] = acc;
    __syncthreads();
    if (tid == 0) {
        u32 x = 0;
        for (int w = 0; w < CRC_WARPS; w++) x ^= warp_sum[w];
        partials[blockIdx.x] = x;
        __threadfence();
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last || warp != 0) return;
    // The last CTA: every other CTA's partial is visible (each fenced before its ticket).
    u32 x = 0;
    for (u32 b = lane; b < gridDim.x; b += 32) x ^= ((volatile u32*)partials)[b];
    for (int off = 16; off > 0; off >>= 1) x ^= __shfl_xor_sync(0xffffffffu, x, off);
    const u32 init = mulmod(0xffffffffu, power8(T, total, lane));
    if (lane == 0) {
        *(volatile u32*)out = x ^ init ^ 0xffffffffu;
        *counter = 0;
    }
}
