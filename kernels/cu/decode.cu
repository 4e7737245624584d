// kvault GPU decoders for codec containers, driven by the decode plans of
// `kvault_codec::plan` (record layouts below mirror its #[repr(C)] structs).
//
// Compiled at run time with NVRTC; no headers, so CPU-only CI can compile it to
// PTX with NVRTC alone. Every float operation is written with an explicit
// rounding intrinsic (no contraction into FMAs), so outputs equal the CPU
// decoder's bit for bit.
//
// Output addressing (all kernels): part `out_slot` (2 * layer + K/V) has a
// cache `[blocks][block_size][channels]` at device address `slots[out_slot]`;
// global token `tok` lives in block `block_table[tok / block_size]`, row
// `tok % block_size`. The canonical layout `[layers][2][tokens][channels]` is
// the special case of one block per slot.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef int i32;
typedef long long i64;

// group_kind: 0 groups are channels, 1 tokens, 2 (row of group_tokens tokens, channel):
// group token / group_tokens * channels + channel, tokens counted from the part's first.
// rho_start: index of a predicted part's `channels` weights in `rho`, 0xFFFFFFFF when not
// predicted (codec/src/plan.rs, RansPart).
struct RansPart {
    u32 out_slot, group_kind, group_start, m, token_offset, first_stream, stream_count, group_tokens, rho_start,
        reserved;
};
struct RansStream { u32 part, token_start, tokens, escape_start, escape_count, data_len; u64 data_offset; };
struct Q8Part { u32 out_slot, token_offset, tokens, param_start; u64 data_offset; };
struct CgPart { u32 out_slot, token_offset, scale_start, cdf_start, max, r0, r1, r2; };
struct CgStream { u32 part, channel, token_start, tokens; u64 data_offset; u32 data_len, r0; };
// dtype: 1 f16, 2 bf16, 3 f32 (kvault_codec::Dtype ids).
struct ExactRow { u32 out_slot, token, dtype, r0; u64 data_offset; };

// Error flags, OR-ed into err[0]; err[1] takes the lowest failing stream.
#define ERR_RANS_STATE 1u
#define ERR_RANS_WORDS 2u
#define ERR_ESCAPES 4u
#define ERR_CACHEGEN 8u

// Output dtypes (kvault_kernels::OutDtype).
#define OUT_F16 0u
#define OUT_BF16 1u
#define OUT_F32 2u

__device__ __forceinline__ u64 row_addr(const u64* slots, const i32* block_table, u32 block_size,
                                        u32 row_bytes, u32 slot, u32 tok) {
    const u64 row = (u64)(u32)block_table[tok / block_size] * block_size + tok % block_size;
    return slots[slot] + row * row_bytes;
}

template <u32 DT>
__device__ __forceinline__ void store_t(u64 addr, float v) {
    if (DT == OUT_F32) {
        *(float*)addr = v;
    } else {
        u16 h;
        if (DT == OUT_F16) {
            asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        } else {
            asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
        }
        *(u16*)addr = h;
    }
}

// The same with the dtype known only at run time (q8, cachegen: not the hot kernels).
__device__ __forceinline__ void store(u64 addr, u32 dtype, float v) {
    if (dtype == OUT_F32) {
        store_t<OUT_F32>(addr, v);
    } else if (dtype == OUT_F16) {
        store_t<OUT_F16>(addr, v);
    } else {
        store_t<OUT_BF16>(addr, v);
    }
}

__device__ __forceinline__ void fail(u32* err, u32 flag, u32 stream) {
    atomicOr(err, flag);
    atomicMin(err + 1, stream);
}

// One 4096-slot symbol table per rANS part (the symbol owning each probability slot),
// 4 KiB, which the decoder stages in shared memory. One thread block per part.
extern "C" __global__ void rans_build_tables(const u16* __restrict__ freqs, u8* __restrict__ tables,
                                             u32 n_parts) {
    const u32 p = blockIdx.x;
    if (p >= n_parts) return;
    __shared__ u32 cum[65];
    if (threadIdx.x == 0) {
        u32 a = 0;
        for (u32 s = 0; s < 64; ++s) {
            cum[s] = a;
            a += freqs[(u64)p * 64 + s];
        }
        cum[64] = a;
    }
    __syncthreads();
    for (u32 slot = threadIdx.x; slot < 4096; slot += blockDim.x) {
        // The largest symbol whose range starts at or before the slot: zero-frequency
        // symbols share their start with the next symbol, so they are never chosen.
        u32 lo = 0, hi = 63;
        while (lo < hi) {
            const u32 mid = (lo + hi + 1) >> 1;
            if (cum[mid] <= slot) lo = mid; else hi = mid - 1;
        }
        tables[(u64)p * 4096 + slot] = (u8)lo;
    }
}

__device__ __forceinline__ u32 rans_word(const u8* s, u32 words, u32 i) {
    return i < words ? ((u32)s[2 * i] | ((u32)s[2 * i + 1] << 8)) : 0u;
}

// rANS streams of the kv-* profiles. One thread block per part: its symbol table and
// (frequency, start) pairs sit in shared memory; eight threads (one per interleaved
// lane) per stream, `blockDim.x / 8` streams of the part at a time. Lanes step through
// their stream's symbols together; a ballot over the eight lanes hands out
// renormalisation words and escape values in symbol order, exactly as the sequential CPU
// decoder consumes them.
template <u32 DT>
__device__ __forceinline__ void rans_decode_impl(
    const u8* __restrict__ input, const RansStream* __restrict__ streams,
    const RansPart* __restrict__ parts, const u8* __restrict__ tables, const u16* __restrict__ freqs,
    const float* __restrict__ steps, const i32* __restrict__ biases, const i32* __restrict__ escapes,
    const u8* __restrict__ rho, const u64* __restrict__ slots, const i32* __restrict__ block_table,
    u32 block_size, u32 channels, u32* err) {
    __shared__ __align__(16) u8 sym_tab[4096];
    // Predicted parts: the part's weights (`channels` bytes, rounded up to 4), then per
    // stream of the round each channel's state (the previous token's residual, clamped to
    // +-127), `channels + 4` bytes apart so that the four streams of a warp fall in
    // different banks: `(blockDim.x / 8 + 1) * (channels + 4)` bytes at launch.
    extern __shared__ signed char pstate[];
    __shared__ u32 fc[64];  // freq | cum << 16
    const u32 part = blockIdx.x;
    const RansPart p = parts[part];
    for (u32 i = threadIdx.x; i < 256; i += blockDim.x)
        ((uint4*)sym_tab)[i] = ((const uint4*)(tables + (u64)part * 4096))[i];
    for (u32 s = threadIdx.x; s < 64; s += blockDim.x) {
        u32 c = 0;
        for (u32 k = 0; k < s; ++k) c += freqs[(u64)part * 64 + k];
        fc[s] = (u32)freqs[(u64)part * 64 + s] | (c << 16);
    }
    __syncthreads();

    constexpr u32 ES = DT == OUT_F32 ? 4u : 2u;
    const u32 lane = threadIdx.x & 7;
    const u32 shift = threadIdx.x & 24;  // this group's first lane in the warp
    const u32 below = (1u << lane) - 1u;
    const float* gstep = steps + p.group_start;
    const i32* gbias = biases + p.group_start;
    const u32 esc_sym = 2 * p.m + 1;
    const u32 row_bytes = channels * ES;
    const u32 per_round = blockDim.x >> 3;
    const bool per_token = p.group_kind == 1;
    const bool rows = p.group_kind == 2;
    const u64 slot_base = slots[p.out_slot];
    const bool predicted = p.rho_start != 0xFFFFFFFFu;
    const u8* wsh = (const u8*)pstate;
    signed char* state = pstate + (u64)((threadIdx.x >> 3) + 1) * (channels + 4);
    if (predicted) {
        for (u32 j = threadIdx.x; j < channels; j += blockDim.x) ((u8*)pstate)[j] = rho[p.rho_start + j];
        __syncthreads();
    }
    // With a multiple of eight channels each lane owns its channels' state.
    const bool shared_state = predicted && (channels & 7u) != 0;

    for (u32 round = 0; round < p.stream_count; round += per_round) {
        const u32 local = round + (threadIdx.x >> 3);
        const bool live = local < p.stream_count;
        const u32 sid = p.first_stream + local;
        RansStream st = {0, 0, 0, 0, 0, 0, 0};
        if (live) st = streams[sid];
        const u32 n = st.tokens * channels;
        const u32 words = st.data_len >> 1;
        const u8* s = input + st.data_offset;

        u32 x = live ? (rans_word(s, words, 2 * lane) | (rans_word(s, words, 2 * lane + 1) << 16)) : 65536u;
        bool bad = x < 65536u;
        u32 pos = 16;
        u32 esc_used = 0;
        // Symbol i = 8k + lane sits at token i / channels, channel i % channels.
        u32 ch = lane, t = 0;
        while (ch >= channels) {
            ch -= channels;
            ++t;
        }
        // Channel groups of the lane's token: the row's first (0 without rows).
        u32 gbase = rows ? (st.token_start + t) / p.group_tokens * channels : 0u;
        // Loads are issued a step before their use, so that their latency overlaps the
        // decoding chain instead of lengthening it: the window of the eight words the
        // group may consume next (lane l holds word pos + l; a lane that needs one takes
        // it from the window by shuffle), the group parameters of the lane's next symbol,
        // and the output address of its next element.
        u32 win = live ? rans_word(s, words, pos + lane) : 0u;
        i32 bias = 0;
        float stp = 0.0f;
        u64 out = 0;
        if (lane < n) {
            const u32 g = per_token ? st.token_start + t : gbase + ch;
            bias = __ldg(gbias + g);
            stp = __ldg(gstep + g);
            const u32 tok = p.token_offset + st.token_start + t;
            out = slot_base + ((u64)(u32)block_table[tok / block_size] * block_size + tok % block_size) * row_bytes +
                  (u64)ch * ES;
        }
        if (predicted) {
            for (u32 j = lane; j < channels; j += 8) state[j] = 0;
            __syncwarp();
        }
        const u32 my_steps = live ? (n + 7) >> 3 : 0u;
        const u32 trips = __reduce_max_sync(0xffffffffu, my_steps);
        for (u32 k = 0; k < trips; ++k) {
            const u32 i = (k << 3) + lane;
            const bool act = i < n;
            u32 sym = 0;
            bool need = false;
            if (act) {
                sym = sym_tab[x & 4095u];
                const u32 f = fc[sym];
                const u32 y = (f & 0xFFFFu) * (x >> 12) + (x & 4095u) - (f >> 16);
                need = y < 65536u;
                x = y;
            }
            const u32 nb = (__ballot_sync(0xffffffffu, need) >> shift) & 0xFFu;
            const u32 w = __shfl_sync(0xffffffffu, win, shift + __popc(nb & below));
            if (need) x = (x << 16) | w;
            pos += __popc(nb);
            win = rans_word(s, words, pos + lane);
            const bool esc = act && sym == esc_sym;
            const u32 eb = (__ballot_sync(0xffffffffu, esc) >> shift) & 0xFFu;
            if (act) {
                float v;
                i32 pred = 0;
                if (predicted) {
                    pred = ((i32)wsh[ch] * (i32)state[ch] + 4) >> 3;
                    state[ch] = esc ? (signed char)0 : (signed char)max(-127, min(127, (i32)sym - (i32)p.m + pred));
                }
                if (!esc) {
                    // (s + bias + pred) wraps in i32 like the CPU's wrapping_add, then rounds
                    // to f32.
                    v = __fmul_rn(__int2float_rn((i32)(sym + (u32)bias + (u32)pred)), stp);
                } else {
                    const u32 ord = esc_used + __popc(eb & below);
                    if (ord < st.escape_count) {
                        const i64 q = (i64)escapes[st.escape_start + ord] + (i64)bias + (i64)p.m;
                        v = __fmul_rn(__ll2float_rn(q), stp);
                    } else {
                        bad = true;
                        v = 0.0f;
                    }
                }
                store_t<DT>(out, v);
            }
            esc_used += __popc(eb);
            // A state written here may be read by another lane of the group next step
            // (channel counts that are not a multiple of eight).
            if (shared_state) __syncwarp();
            ch += 8;
            if (ch < channels) {
                out += 8 * ES;
                if (!per_token && i + 8 < n) {
                    bias = __ldg(gbias + gbase + ch);
                    stp = __ldg(gstep + gbase + ch);
                }
            } else {
                while (ch >= channels) {
                    ch -= channels;
                    ++t;
                }
                if (i + 8 < n) {
                    if (rows) gbase = (st.token_start + t) / p.group_tokens * channels;
                    const u32 g = per_token ? st.token_start + t : gbase + ch;
                    bias = __ldg(gbias + g);
                    stp = __ldg(gstep + g);
                    const u32 tok = p.token_offset + st.token_start + t;
                    out = slot_base +
                          ((u64)(u32)block_table[tok / block_size] * block_size + tok % block_size) * row_bytes +
                          (u64)ch * ES;
                }
            }
        }
        if (live) {
            if (bad || x != 65536u) fail(err, ERR_RANS_STATE, sid);
            if (lane == 0 && pos != words) fail(err, ERR_RANS_WORDS, sid);
            if (lane == 0 && esc_used != st.escape_count) fail(err, ERR_ESCAPES, sid);
        }
    }
}

#define RANS_DECODE(NAME, DT)                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                                    \
        const u8* __restrict__ input, const RansStream* __restrict__ streams,                                   \
        const RansPart* __restrict__ parts, const u8* __restrict__ tables, const u16* __restrict__ freqs,     \
        const float* __restrict__ steps, const i32* __restrict__ biases, const i32* __restrict__ escapes,     \
        const u8* __restrict__ rho, const u64* __restrict__ slots, const i32* __restrict__ block_table,       \
        u32 block_size, u32 channels, u32* err) {                                                                \
        rans_decode_impl<DT>(input, streams, parts, tables, freqs, steps, biases, escapes, rho, slots,        \
                             block_table, block_size, channels, err);                                           \
    }
RANS_DECODE(rans_decode_f16, OUT_F16)
RANS_DECODE(rans_decode_bf16, OUT_BF16)
RANS_DECODE(rans_decode_f32, OUT_F32)

// q8: one element per thread; blockIdx.y picks the part (offset by part_base).
extern "C" __global__ void q8_decode(const u8* __restrict__ input, const Q8Part* __restrict__ parts,
                                     u32 part_base, const float* __restrict__ lo_step,
                                     const u64* __restrict__ slots, const i32* __restrict__ block_table,
                                     u32 block_size, u32 channels, u32 dtype) {
    const Q8Part p = parts[part_base + blockIdx.y];
    const u32 n = p.tokens * channels;
    const u32 esize = dtype == OUT_F32 ? 4u : 2u;
    const float* lo = lo_step + p.param_start;
    const float* step = lo + channels;
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const u32 t = i / channels, ch = i % channels;
        const float v = __fadd_rn(lo[ch], __fmul_rn((float)input[p.data_offset + i], step[ch]));
        store(row_addr(slots, block_table, block_size, channels * esize, p.out_slot, p.token_offset + t) +
                  (u64)ch * esize,
              dtype, v);
    }
}

__device__ __forceinline__ u32 cg_bit(const u8* s, u32 len, u64 i) {
    return (i >> 3) < len ? (s[i >> 3] >> (7 - (i & 7))) & 1u : 0u;
}

// cachegen-baseline: one thread per (channel, 256-token) stream, bitwise binary
// arithmetic decoding — the released CacheGen decoder's scheme, kept as the baseline.
extern "C" __global__ void cachegen_decode(const u8* __restrict__ input, const CgStream* __restrict__ streams,
                                           u32 n_streams, const CgPart* __restrict__ parts,
                                           const float* __restrict__ scales, const u16* __restrict__ cdfs,
                                           const u64* __restrict__ slots, const i32* __restrict__ block_table,
                                           u32 block_size, u32 channels, u32 dtype, u32* err) {
    const u32 sid = blockIdx.x * blockDim.x + threadIdx.x;
    if (sid >= n_streams) return;
    const CgStream st = streams[sid];
    const CgPart p = parts[st.part];
    const u8* s = input + st.data_offset;
    const u16* cdf = cdfs + p.cdf_start + (u64)st.channel * 33;
    const float maxf = (float)p.max;
    const u32 esize = dtype == OUT_F32 ? 4u : 2u;
    u32 value = 0;
    for (u32 i = 0; i < 32; ++i) value = (value << 1) | cg_bit(s, st.data_len, i);
    u64 next = 32;
    u32 low = 0, high = 0xFFFFFFFFu;
    for (u32 i = 0; i < st.tokens; ++i) {
        const u64 range = (u64)(high - low) + 1;
        const u32 count = (u32)(u16)(((((u64)(value - low)) + 1) * 65536 - 1) / range);
        u32 c = 0;
        for (u32 k = 0; k < 32; ++k) c += cdf[k] <= count ? 1u : 0u;
        const u32 sym = c ? c - 1 : 0;
        const u32 tok = st.token_start + i;
        const float v =
            __fmul_rn(__fdiv_rn(__fsub_rn((float)sym, maxf), maxf), scales[p.scale_start + tok]);
        store(row_addr(slots, block_table, block_size, channels * esize, p.out_slot, p.token_offset + tok) +
                  (u64)st.channel * esize,
              dtype, v);
        if (i + 1 == st.tokens) break;
        const u64 c_lo = cdf[sym];
        const u64 c_hi = sym == 31 ? 0x10000ull : (u64)cdf[sym + 1];
        high = (u32)((u64)low + ((range * c_hi) >> 16) - 1);
        low = low + (u32)((range * c_lo) >> 16);
        u32 renorm = 0;
        for (;;) {
            if (low >= 0x80000000u || high < 0x80000000u) {
                low <<= 1;
                high = (high << 1) | 1u;
                value = (value << 1) | cg_bit(s, st.data_len, next);
            } else if (low >= 0x40000000u && high < 0xC0000000u) {
                low = (low << 1) & 0x7FFFFFFFu;
                high = (high << 1) | 0x80000001u;
                value = ((value - 0x40000000u) << 1) | cg_bit(s, st.data_len, next);
            } else {
                break;
            }
            ++next;
            if (++renorm > 64) {
                fail(err, ERR_CACHEGEN, sid);
                return;
            }
        }
    }
}

// Rows the kv-* encoder stored exactly (exception tokens), written over what rans_decode
// wrote there: launched after it on the same stream. One thread block per row; each
// element converted exactly to f32 (bytes assembled one by one: rows sit at any offset),
// then rounded to the output dtype as every other decoded element.
extern "C" __global__ void exact_rows(const u8* __restrict__ input, const ExactRow* __restrict__ rows,
                                      u32 n_rows, const u64* __restrict__ slots,
                                      const i32* __restrict__ block_table, u32 block_size, u32 channels,
                                      u32 dtype) {
    const u32 r = blockIdx.x;
    if (r >= n_rows) return;
    const ExactRow e = rows[r];
    const u32 esize = dtype == OUT_F32 ? 4u : 2u;
    const u64 base = row_addr(slots, block_table, block_size, channels * esize, e.out_slot, e.token);
    const u8* src = input + e.data_offset;
    for (u32 ch = threadIdx.x; ch < channels; ch += blockDim.x) {
        float v;
        if (e.dtype == 3u) {
            const u8* b = src + (u64)ch * 4;
            v = __uint_as_float((u32)b[0] | ((u32)b[1] << 8) | ((u32)b[2] << 16) | ((u32)b[3] << 24));
        } else {
            const u8* b = src + (u64)ch * 2;
            const u16 h = (u16)((u32)b[0] | ((u32)b[1] << 8));
            if (e.dtype == 2u) {
                v = __uint_as_float((u32)h << 16);
            } else {
                asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h));
            }
        }
        store(base + (u64)ch * esize, dtype, v);
    }
}

// Copies rows of a canonical `[slot][token][row_bytes]` buffer into the output layout:
// how chunks decoded on the CPU (profiles without a GPU decoder) reach paged caches.
// grid = (tokens, slots).
extern "C" __global__ void scatter_rows(const u8* __restrict__ src, u32 tokens, u32 row_bytes,
                                        const u64* __restrict__ slots, const i32* __restrict__ block_table,
                                        u32 block_size) {
    const u32 tok = blockIdx.x, slot = blockIdx.y;
    const u8* from = src + ((u64)slot * tokens + tok) * row_bytes;
    u8* to = (u8*)(slots[slot] + ((u64)(u32)block_table[tok / block_size] * block_size + tok % block_size) * row_bytes);
    for (u32 i = threadIdx.x; i < row_bytes; i += blockDim.x) to[i] = from[i];
}
