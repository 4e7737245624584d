// Decode attention over f16 KV in device memory: the GPU worker of the Attend contract
// (kvault.v1 Attend: normalised o per query head and lse = ln sum exp(scale q.k)).
//
// KV is the GPU decoder's canonical layout, [layers, 2, tokens, kv_heads, head_dim] f16
// (K then V of each layer), so chunks decoded on the GPU are attended where they land.
//
// Two kernels, flash-decoding style:
//   attend_partials: one warp per (query, KV head, head group, token piece); each warp
//     walks its piece in tiles of 32 tokens and keeps an online softmax (m, l, acc) for
//     the GT query heads of its group; it writes them unnormalised.
//   attend_combine: one block per (query, query head) merges the pieces exactly.
//
// A warp reads a token's row with LPT lanes (16 channels, two 16-byte loads, per lane)
// and works on 32 / LPT tokens at once; every KV byte of a piece is read once for all the
// query heads of the group.

#define WARPS 4
#define TILE 32
// A lane's sixteen query channels sit 20 floats apart in shared memory, so that the eight
// lanes of a 16-byte load phase hit distinct banks.
#define QSTRIDE 20

// Rows a lane loads before using them, and blocks per SM the registers must allow.
// Measured on an H200 (docs/figures.md): unbounded, 245 registers a thread left room for
// 8 warps per SM; 8 rows with 3 blocks (at most 170 registers) was the best of (4 rows,
// 4 blocks), (4, 3) and (8, 3), level with unbounded on Llama-3-8B's shape and 8 % faster
// on SmolLM2's.
#define ROWS_IN_FLIGHT 8
#define MIN_BLOCKS 3

typedef unsigned long long u64;
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Eight f16 of a 16-byte word into floats.
__device__ __forceinline__ void unpack8(uint4 w, float* out) {
    unsigned int u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = h2f((unsigned short)(u[i] & 0xffff));
        out[2 * i + 1] = h2f((unsigned short)(u[i] >> 16));
    }
}

// The 16-byte words of sixteen channels of a row from channel c0 (zeros past d; rows are
// 16-byte aligned because d is a multiple of 8).
__device__ __forceinline__ void load_row(const unsigned short* row, int c0, int d, uint4* out) {
    const uint4* p = reinterpret_cast<const uint4*>(row + c0);
    const uint4 z = make_uint4(0, 0, 0, 0);
    out[0] = c0 < d ? __ldg(p) : z;
    out[1] = c0 + 8 < d ? __ldg(p + 1) : z;
}

// Per query: layer, start, end (tokens [start, end) of the prefix).
struct QueryMeta {
    int layer;
    int start;
    int end;
    float scale;
};

// grid (ceil(pieces / WARPS), kv_heads * groups, queries), block 32 * WARPS.
// q: [queries][q_heads][d] f32. part: [queries][q_heads][pieces][2 + d] f32 (m, l, acc).
// LPT (lanes per token) is a template argument so that a tile's loops unroll and each
// lane has all of its rows' loads in flight at once (with a run-time trip count a warp
// waited for one row at a time and reached a quarter of the copy bandwidth).
template <int GT, int LPT>
__device__ void partials(const unsigned short* __restrict__ kv, int tokens, int kv_heads, int d,
                         const float* __restrict__ q, const QueryMeta* __restrict__ meta,
                         int q_heads, int groups, int pieces, float* __restrict__ part) {
    constexpr int lpt = LPT;
    extern __shared__ float smem[];
    const int g = q_heads / kv_heads;
    const int qi = blockIdx.z;
    const int kh = blockIdx.y / groups;
    const int h0 = (blockIdx.y % groups) * GT;
    const int nh = min(GT, g - h0);
    const QueryMeta m = meta[qi];
    // Scaled queries of the group, [GT][lpt * QSTRIDE] (zeros past d), then per warp the
    // tile's scores [GT][TILE].
    const int qrow = lpt * QSTRIDE;
    float* qs = smem;
    for (int i = threadIdx.x; i < GT * qrow; i += blockDim.x) {
        const int h = i / qrow, r = i % qrow;
        const int c = (r / QSTRIDE) * 16 + r % QSTRIDE;
        const bool in = h < nh && r % QSTRIDE < 16 && c < d;
        qs[i] = in ? q[((u64)qi * q_heads + kh * g + h0 + h) * d + c] * m.scale : 0.f;
    }
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int piece = blockIdx.x * WARPS + warp;
    if (piece >= pieces) return;
    float* sc = smem + GT * qrow + warp * GT * TILE;
    // This warp's tokens: piece `piece` of [start, end) in whole tiles.
    const int len = m.end - m.start;
    const int tiles = (len + TILE - 1) / TILE;
    const int per = (tiles + pieces - 1) / pieces;
    const int a = min(m.start + piece * per * TILE, m.end);
    const int b = min(a + per * TILE, m.end);
    const int sub = lane % lpt, grp = lane / lpt;
    constexpr int spw = 32 / lpt;
    // Tokens of a tile per group of lanes, and how many of their rows load at once.
    constexpr int PER = TILE / spw;
    constexpr int NB = PER < ROWS_IN_FLIGHT ? PER : ROWS_IN_FLIGHT;
    const int c0 = sub * 16;
    const u64 row = (u64)kv_heads * d;
    const unsigned short* kbase = kv + ((u64)m.layer * 2 * tokens) * row + (u64)kh * d;
    const unsigned short* vbase = kbase + (u64)tokens * row;
    float mx[GT], l[GT], acc[GT][16];
#pragma unroll
    for (int h = 0; h < GT; h++) {
        mx[h] = NEG_INF;
        l[h] = 0.f;
#pragma unroll
        for (int c = 0; c < 16; c++) acc[h][c] = 0.f;
    }
    for (int tb = a; tb < b; tb += TILE) {
        // Ask L2 for the next tile's rows (lane j: token j) while this one computes: a
        // warp otherwise has only a few rows in flight.
        if (tb + TILE + lane < b) {
            const char* kr = reinterpret_cast<const char*>(kbase + (u64)(tb + TILE + lane) * row);
            const char* vr = reinterpret_cast<const char*>(vbase + (u64)(tb + TILE + lane) * row);
            for (int off = 0; off < 2 * d; off += 128) {
                asm volatile("prefetch.global.L2 [%0];" ::"l"(kr + off));
                asm volatile("prefetch.global.L2 [%0];" ::"l"(vr + off));
            }
            asm volatile("prefetch.global.L2 [%0];" ::"l"(kr + 2 * d - 1));
            asm volatile("prefetch.global.L2 [%0];" ::"l"(vr + 2 * d - 1));
        }
        // Scores of the tile's tokens: group `grp` takes tokens grp, grp + spw, ... (a
        // token past the range reads the last row and scores -inf). Rows are loaded NB at
        // a time, all in flight together, then used.
#pragma unroll
        for (int j0 = 0; j0 < PER; j0 += NB) {
            uint4 kr[NB][2];
#pragma unroll
            for (int u = 0; u < NB; u++) {
                const int t = min(tb + grp + (j0 + u) * spw, b - 1);
                load_row(kbase + (u64)t * row, c0, d, kr[u]);
            }
#pragma unroll
            for (int u = 0; u < NB; u++) {
                const int j = grp + (j0 + u) * spw;
                float k[16];
                unpack8(kr[u][0], k);
                unpack8(kr[u][1], k + 8);
                float s[GT];
#pragma unroll
                for (int h = 0; h < GT; h++) {
                    const float4* qh = reinterpret_cast<const float4*>(qs + h * qrow + sub * QSTRIDE);
                    s[h] = 0.f;
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        const float4 x = qh[i];
                        s[h] = fmaf(x.x, k[4 * i], s[h]);
                        s[h] = fmaf(x.y, k[4 * i + 1], s[h]);
                        s[h] = fmaf(x.z, k[4 * i + 2], s[h]);
                        s[h] = fmaf(x.w, k[4 * i + 3], s[h]);
                    }
                }
                // Sum over the token's lanes.
#pragma unroll
                for (int h = 0; h < GT; h++) {
#pragma unroll
                    for (int o = lpt / 2; o > 0; o /= 2) s[h] += __shfl_xor_sync(0xffffffff, s[h], o);
                }
                if (sub == 0) {
#pragma unroll
                    for (int h = 0; h < GT; h++) sc[h * TILE + j] = tb + j < b ? s[h] : NEG_INF;
                }
            }
        }
        __syncwarp();
        // Tile max and weights: lane j holds token j.
#pragma unroll
        for (int h = 0; h < GT; h++) {
            float x = sc[h * TILE + lane];
            float tm = x;
            for (int o = 16; o > 0; o /= 2) tm = fmaxf(tm, __shfl_xor_sync(0xffffffff, tm, o));
            const float mn = fmaxf(mx[h], tm);
            // mn is finite: every tile holds at least one token of the range.
            const float corr = expf(mx[h] - mn);
            const float p = expf(x - mn);
            float ps = p;
            for (int o = 16; o > 0; o /= 2) ps += __shfl_xor_sync(0xffffffff, ps, o);
            l[h] = l[h] * corr + ps;
            mx[h] = mn;
#pragma unroll
            for (int c = 0; c < 16; c++) acc[h][c] *= corr;
            sc[h * TILE + lane] = p;
        }
        __syncwarp();
        // Values: the same tokens per group, weighted (tokens past the range skipped).
#pragma unroll
        for (int j0 = 0; j0 < PER; j0 += NB) {
            uint4 vr[NB][2];
#pragma unroll
            for (int u = 0; u < NB; u++) {
                const int t = min(tb + grp + (j0 + u) * spw, b - 1);
                load_row(vbase + (u64)t * row, c0, d, vr[u]);
            }
#pragma unroll
            for (int u = 0; u < NB; u++) {
                const int j = grp + (j0 + u) * spw;
                if (tb + j >= b) continue;
                float v[16];
                unpack8(vr[u][0], v);
                unpack8(vr[u][1], v + 8);
#pragma unroll
                for (int h = 0; h < GT; h++) {
                    const float p = sc[h * TILE + j];
#pragma unroll
                    for (int c = 0; c < 16; c++) acc[h][c] = fmaf(p, v[c], acc[h][c]);
                }
            }
        }
        __syncwarp();
    }
    // Groups of lanes summed different tokens: add them up.
#pragma unroll
    for (int h = 0; h < GT; h++) {
#pragma unroll
        for (int c = 0; c < 16; c++) {
#pragma unroll
            for (int o = lpt; o < 32; o *= 2) acc[h][c] += __shfl_xor_sync(0xffffffff, acc[h][c], o);
        }
    }
    if (grp == 0) {
        for (int h = 0; h < nh; h++) {
            float* out = part + (((u64)qi * q_heads + kh * g + h0 + h) * pieces + piece) * (2 + d);
            if (sub == 0) {
                out[0] = mx[h];
                out[1] = l[h];
            }
#pragma unroll
            for (int c = 0; c < 16; c++) {
                if (c0 + c < d) out[2 + c0 + c] = acc[h][c];
            }
        }
    }
}

#define PARTIALS(GT, LPT)                                                                         \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, MIN_BLOCKS)                          \
        attend_partials_##GT##_##LPT(                                                             \
        const unsigned short* kv, int tokens, int kv_heads, int d, const float* q,              \
        const QueryMeta* meta, int q_heads, int groups, int pieces, float* part) {              \
        partials<GT, LPT>(kv, tokens, kv_heads, d, q, meta, q_heads, groups, pieces, part);     \
    }
#define PARTIALS_LPT(GT) \
    PARTIALS(GT, 1) PARTIALS(GT, 2) PARTIALS(GT, 4) PARTIALS(GT, 8) PARTIALS(GT, 16) PARTIALS(GT, 32)

PARTIALS_LPT(1)
PARTIALS_LPT(2)
PARTIALS_LPT(4)

// grid (queries * q_heads), block 128: merges a head's pieces. o: [queries][q_heads][d],
// lse: [queries][q_heads]. All pieces empty (an empty range): lse = -inf, o = 0.
extern "C" __global__ void attend_combine(const float* __restrict__ part, int pieces, int d,
                                          float* __restrict__ o, float* __restrict__ lse) {
    const u64 qh = blockIdx.x;
    const float* p = part + qh * pieces * (2 + d);
    float mm = NEG_INF;
    for (int s = 0; s < pieces; s++) {
        if (p[s * (2 + d) + 1] > 0.f) mm = fmaxf(mm, p[s * (2 + d)]);
    }
    if (mm == NEG_INF) {
        for (int c = threadIdx.x; c < d; c += blockDim.x) o[qh * d + c] = 0.f;
        if (threadIdx.x == 0) lse[qh] = NEG_INF;
        return;
    }
    float total = 0.f;
    for (int s = 0; s < pieces; s++) {
        const float l = p[s * (2 + d) + 1];
        if (l > 0.f) total += l * expf(p[s * (2 + d)] - mm);
    }
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float x = 0.f;
        for (int s = 0; s < pieces; s++) {
            const float l = p[s * (2 + d) + 1];
            if (l > 0.f) x += p[s * (2 + d) + 2 + c] * expf(p[s * (2 + d)] - mm);
        }
        o[qh * d + c] = x / total;
    }
    if (threadIdx.x == 0) lse[qh] = mm + logf(total);
}
