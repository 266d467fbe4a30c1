// FP8AdamW's CPU step (see optim.py, "_one_pass"): per parameter, one read of g for its amax, then
// one loop that reads p, g, m, v and writes p, m, v. No torch headers: the library builds in seconds
// and is called through ctypes (cpu_kernel.py). OpenMP is torch's own runtime: libgomp.so.1 is
// already loaded by torch when this library is, so torch.set_num_threads governs it too.
//
// Built with -ffp-contract=off: the eager pass's fp32 operations in its order, with IEEE (correctly
// rounded) sqrt and division. The states come out bit-identical to the eager pass's; weights can
// differ by an ulp where torch's vectorized CPU sqrt is not correctly rounded. Each value is
// computed on its own and amaxes are maxima, so the result does not depend on the thread count.
//
// The inner loop is AVX-512 F/BW/VL/DQ (16 values) or AVX2 + F16C (8 values) intrinsics, with the
// hardware's fp16 conversions, where the compiler targets them (-march=native); elsewhere, and for
// the last values, the scalar code below (exact integer conversions; the compiler does not vectorize it).
#include <bit>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr float E4M3_MAX = 448.0f;
constexpr float FP16_MAX = 65504.0f;
constexpr float FP16_TINY = 5.9604644775390625e-08f;  // 2**-24, the smallest positive fp16
constexpr float E4M3_ROUND = 1.0625f;                  // 1 + 2**-4: half an E4M3 ulp, relative
constexpr int64_t CHUNK = 16384;                       // values per parallel work item (64 KiB of g)

enum Hp { LR, DECAY, B1, C1, B2, C2, INV_BC1, INV_BC2, EPS, N_HP };

inline uint32_t bits(float x) { return std::bit_cast<uint32_t>(x); }

// Exact conversions in integer arithmetic that never make a subnormal fp32 (slow on x86): a
// subnormal code's value is an fp32 with the format's smallest normal exponent minus that normal.
inline float f32(uint32_t b) { return std::bit_cast<float>(b); }

// E4M3 code -> fp32, exact.
inline float decode_e4m3(uint8_t c) {
    uint32_t mag = c & 0x7fu, sign = (c & 0x80u) << 24;
    float normal = f32((mag << 20) + (120u << 23));
    float sub = f32(0x3c800000u | (mag << 20)) - 0.015625f;  // 2**-6 * (1 + m/8) - 2**-6
    return f32(bits(mag < 8u ? sub : normal) | sign);
}

// fp16 bits -> fp32, exact.
inline float decode_fp16(uint16_t h) {
    uint32_t mag = h & 0x7fffu, sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    float normal = f32((mag << 13) + (112u << 23));
    float sub = f32(0x38800000u | (mag << 13)) - 6.103515625e-05f;  // 2**-14 * (1 + m/1024) - 2**-14
    return f32(bits(mag < 0x400u ? sub : normal) | sign);
}

// fp32 in [-65504, 65504] -> fp16 bits, round to nearest even (as torch's cast). Below 2**-14 (fp16
// subnormals, step 2**-24): adding 0.5 makes the fp32 adder round at that step.
inline uint16_t encode_fp16(float x) {
    uint32_t b = bits(x), a = b & 0x7fffffffu, sign = (b >> 16) & 0x8000u;
    uint32_t sub = bits(f32(a) + 0.5f) - 0x3f000000u;
    uint32_t normal = (a + 0xfffu + ((a >> 13) & 1u) - (112u << 23)) >> 13;
    return static_cast<uint16_t>((a < 0x38800000u ? sub : normal) | sign);
}

// fp32 in [-448, 448] -> E4M3 code, round to nearest even (as torch's cast). Values below 2**-6
// (E4M3's subnormals, step 2**-9): adding 2**14 makes the fp32 adder round at that step.
inline uint8_t encode_e4m3(float x) {
    uint32_t b = bits(x), a = b & 0x7fffffffu, sign = (b >> 24) & 0x80u;
    uint32_t sub = bits(f32(a) + 16384.0f) - 0x46800000u;
    uint32_t normal = (a + 0x7ffffu + ((a >> 20) & 1u) - (120u << 23)) >> 20;
    return static_cast<uint8_t>((a < 0x3c800000u ? sub : normal) | sign);
}

inline float clampf(float x, float lo, float hi) {
    x = x < lo ? lo : x;
    return x > hi ? hi : x;
}

// The largest power of two s with amax * s <= fmax (exponent in [-126, 126]); `old` when amax is
// 0 or not finite. Exact: compares significands instead of rounding a log2.
float pow2_scale(float amax, float fmax, float old) {
    if (!(amax > 0.0f) || !std::isfinite(amax)) return old;
    int ea, ef;
    float ma = std::frexp(amax, &ea), mf = std::frexp(fmax, &ef);
    int k = ef - ea - (ma > mf ? 1 : 0);
    k = k < -126 ? -126 : (k > 126 ? 126 : k);
    return std::ldexp(1.0f, k);
}

struct Chunk {  // a parallel work item: values [begin, end) of one piece
    int64_t piece, begin, end;
};

// amax|g| as the bits of |g|: integer order is float order for non-negative values, and any
// inf/NaN lands above every finite value, so one integer max also tells whether g is finite.
uint32_t abs_bits_max(const float* __restrict g, int64_t n) {
    uint32_t r = 0;
    for (int64_t i = 0; i < n; ++i) {
        uint32_t a = bits(g[i]) & 0x7fffffffu;
        r = a > r ? a : r;
    }
    return r;
}

void step_fp32(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
               int64_t n, const float* hp) {
    const float lr = hp[LR], decay = hp[DECAY], b1 = hp[B1], c1 = hp[C1], b2 = hp[B2], c2 = hp[C2];
    const float ibc1 = hp[INV_BC1], ibc2 = hp[INV_BC2], eps = hp[EPS];
    for (int64_t i = 0; i < n; ++i) {
        float gi = g[i];
        float mn = b1 * m[i] + c1 * gi;
        float vn = b2 * v[i] + c2 * (gi * gi);
        p[i] = p[i] * decay - lr * (mn * ibc1) / (std::sqrt(vn * ibc2) + eps);
        m[i] = mn;
        v[i] = vn;
    }
}

// One value of the fp8 update; returns the bits of |m_new * new_m_scale| (clamped, before rounding
// to E4M3), for the amax the next step's scale starts from.
inline uint32_t update_fp8(float& p, float g, uint8_t& m, uint16_t& v, const float* hp, float inv_ms, float inv_vs,
                           float new_ms, float new_vs) {
    float mn = hp[B1] * (decode_e4m3(m) * inv_ms) + hp[C1] * g;
    float vn = hp[B2] * (decode_fp16(v) * inv_vs) + hp[C2] * (g * g);
    p = p * hp[DECAY] - hp[LR] * (mn * hp[INV_BC1]) / (std::sqrt(vn * hp[INV_BC2]) + hp[EPS]);
    float ms = clampf(mn * new_ms, -E4M3_MAX, E4M3_MAX);
    float vs = clampf(vn * new_vs, -FP16_MAX, FP16_MAX);
    float lifted = vs < FP16_TINY ? FP16_TINY : vs;  // a positive v never rounds to 0
    vs = vn > 0.0f ? lifted : vs;
    m = encode_e4m3(ms);
    v = encode_fp16(vs);
    return bits(ms) & 0x7fffffffu;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
// The same update, 16 values at a time: the hardware fp16 conversions (exact, round to nearest
// even, subnormals included) are what the compiler does not vectorize from the scalar code.
// `inv_ms256` is 256 / m_scale (exact: powers of two; the caller checks it is finite). vrangeps
// clamps |x| to a bound keeping (or clearing) the sign in one instruction; vpternlogd merges bits.
inline __m512i update_fp8_x16(float* p, const float* g, uint8_t* m, uint16_t* v, const float* hp, __m512 inv_ms256,
                              __m512 inv_vs, __m512 new_ms, __m512 new_vs) {
    const __m512 gi = _mm512_loadu_ps(g);
    // E4M3 -> fp16 bits (the value times 2**-8): sign-extended to 16 bits and shifted by 7, the sign
    // lands in bits 14-15 and exponent and mantissa in bits 7-13; bit 14 is cleared.
    __m256i c = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)));
    __m256i h = _mm256_and_si256(_mm256_slli_epi16(c, 7), _mm256_set1_epi16(static_cast<int16_t>(0xbfff)));
    __m512 m_old = _mm512_mul_ps(_mm512_cvtph_ps(h), inv_ms256);
    __m512 v_old = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v))), inv_vs);
    __m512 mn = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(hp[B1]), m_old), _mm512_mul_ps(_mm512_set1_ps(hp[C1]), gi));
    __m512 vn = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(hp[B2]), v_old),
                              _mm512_mul_ps(_mm512_set1_ps(hp[C2]), _mm512_mul_ps(gi, gi)));
    __m512 step = _mm512_div_ps(
        _mm512_mul_ps(_mm512_set1_ps(hp[LR]), _mm512_mul_ps(mn, _mm512_set1_ps(hp[INV_BC1]))),
        _mm512_add_ps(_mm512_sqrt_ps(_mm512_mul_ps(vn, _mm512_set1_ps(hp[INV_BC2]))), _mm512_set1_ps(hp[EPS])));
    _mm512_storeu_ps(p, _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(p), _mm512_set1_ps(hp[DECAY])), step));
    // imm 0x0a: the smaller magnitude, sign cleared (|ms|); 0x02: the same, with the sign of the first.
    __m512i a = _mm512_castps_si512(_mm512_range_ps(_mm512_mul_ps(mn, new_ms), _mm512_set1_ps(E4M3_MAX), 0x0a));
    __m512 vs = _mm512_range_ps(_mm512_mul_ps(vn, new_vs), _mm512_set1_ps(FP16_MAX), 0x02);
    __mmask16 positive = _mm512_cmp_ps_mask(vn, _mm512_setzero_ps(), _CMP_GT_OQ);
    vs = _mm512_mask_max_ps(vs, positive, vs, _mm512_set1_ps(FP16_TINY));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(v), _mm512_cvtps_ph(vs, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    // |ms| -> E4M3 magnitude as encode_e4m3, then the sign of mn (that of ms: new_ms > 0).
    __m512i sub = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(16384.0f))),
                                   _mm512_set1_epi32(0x46800000));
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(a, 20), _mm512_set1_epi32(1));
    __m512i normal = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(a, odd), _mm512_set1_epi32(0x7ffff - (120 << 23))), 20);
    __mmask16 small = _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(0x3c800000));
    __m512i code = _mm512_ternarylogic_epi32(_mm512_mask_blend_epi32(small, normal, sub),
                                             _mm512_srli_epi32(_mm512_castps_si512(mn), 24), _mm512_set1_epi32(0x80),
                                             0xf8);  // A | (B & C)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(m), _mm512_cvtepi32_epi8(code));
    return a;
}
#endif

#if defined(__AVX2__) && defined(__F16C__)
// The same update, 8 values at a time with AVX2 and F16C.
inline __m256i update_fp8_x8(float* p, const float* g, uint8_t* m, uint16_t* v, const float* hp, __m256 inv_ms,
                             __m256 inv_vs, __m256 new_ms, __m256 new_vs) {
    const __m256 gi = _mm256_loadu_ps(g);
    __m128i c = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
    __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x7f)), 7),
                             _mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x80)), 8));
    __m256 m_old = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f)), inv_ms);
    __m256 v_old = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v))), inv_vs);
    __m256 mn = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(hp[B1]), m_old), _mm256_mul_ps(_mm256_set1_ps(hp[C1]), gi));
    __m256 vn = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(hp[B2]), v_old),
                              _mm256_mul_ps(_mm256_set1_ps(hp[C2]), _mm256_mul_ps(gi, gi)));
    __m256 step = _mm256_div_ps(
        _mm256_mul_ps(_mm256_set1_ps(hp[LR]), _mm256_mul_ps(mn, _mm256_set1_ps(hp[INV_BC1]))),
        _mm256_add_ps(_mm256_sqrt_ps(_mm256_mul_ps(vn, _mm256_set1_ps(hp[INV_BC2]))), _mm256_set1_ps(hp[EPS])));
    _mm256_storeu_ps(p, _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(p), _mm256_set1_ps(hp[DECAY])), step));
    __m256 ms = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(mn, new_ms), _mm256_set1_ps(-E4M3_MAX)),
                              _mm256_set1_ps(E4M3_MAX));
    __m256 vs = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(vn, new_vs), _mm256_set1_ps(-FP16_MAX)),
                              _mm256_set1_ps(FP16_MAX));
    __m256 positive = _mm256_cmp_ps(vn, _mm256_setzero_ps(), _CMP_GT_OQ);
    vs = _mm256_blendv_ps(vs, _mm256_max_ps(vs, _mm256_set1_ps(FP16_TINY)), positive);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(v), _mm256_cvtps_ph(vs, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i b = _mm256_castps_si256(ms), a = _mm256_and_si256(b, _mm256_set1_epi32(0x7fffffff));
    __m256i sign = _mm256_and_si256(_mm256_srli_epi32(b, 24), _mm256_set1_epi32(0x80));
    __m256i sub = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(16384.0f))),
                                   _mm256_set1_epi32(0x46800000));
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1));
    __m256i normal = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(a, odd), _mm256_set1_epi32(0x7ffff - (120 << 23))), 20);
    __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3c800000), a);  // a < 2**-6 (a >= 0 as int)
    __m256i code = _mm256_or_si256(_mm256_blendv_epi8(normal, sub, small), sign);
    __m128i c16 = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(m), _mm_packus_epi16(c16, c16));
    return a;
}
#endif

// Returns the bits of amax|m_new * new_m_scale| (clamped, before rounding to E4M3).
uint32_t step_fp8(float* __restrict p, const float* __restrict g, uint8_t* __restrict m, uint16_t* __restrict v,
                  int64_t n, const float* hp, float m_scale, float v_scale, float new_m_scale, float new_v_scale) {
    const float inv_ms = 1.0f / m_scale, inv_vs = 1.0f / v_scale;
    uint32_t amax = 0;
    int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
    if (std::isfinite(inv_ms * 256.0f)) {  // else (a scale near fp32's limit) the scalar code below
        __m512i amax16 = _mm512_setzero_si512();
        const __m512 ims = _mm512_set1_ps(inv_ms * 256.0f), ivs = _mm512_set1_ps(inv_vs);
        const __m512 nms = _mm512_set1_ps(new_m_scale), nvs = _mm512_set1_ps(new_v_scale);
        for (; i + 16 <= n; i += 16)
            amax16 = _mm512_max_epu32(amax16, update_fp8_x16(p + i, g + i, m + i, v + i, hp, ims, ivs, nms, nvs));
        amax = _mm512_reduce_max_epu32(amax16);
    }
#elif defined(__AVX2__) && defined(__F16C__)
    __m256i amax8 = _mm256_setzero_si256();
    const __m256 ims = _mm256_set1_ps(inv_ms), ivs = _mm256_set1_ps(inv_vs);
    const __m256 nms = _mm256_set1_ps(new_m_scale), nvs = _mm256_set1_ps(new_v_scale);
    for (; i + 8 <= n; i += 8)
        amax8 = _mm256_max_epu32(amax8, update_fp8_x8(p + i, g + i, m + i, v + i, hp, ims, ivs, nms, nvs));
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), amax8);
    for (uint32_t a : lanes) amax = a > amax ? a : amax;
#endif
    for (; i < n; ++i) {
        uint32_t a = update_fp8(p[i], g[i], m[i], v[i], hp, inv_ms, inv_vs, new_m_scale, new_v_scale);
        amax = a > amax ? a : amax;
    }
    return amax;
}


// A parameter's work items and the amax|g| of each (as abs_bits_max returns it).
struct Plan {
    bool cut = false;
    int64_t pieces = 0;
    std::vector<Chunk> chunks;
    std::vector<uint32_t> g_bits;
};

Plan plan(int64_t i, const int64_t* numel, const int32_t* fp8, const int64_t* n_pieces, const int64_t** cuts) {
    Plan out;
    out.cut = fp8[i] && cuts[i];
    out.pieces = out.cut ? n_pieces[i] : 1;
    for (int64_t k = 0; k < out.pieces; ++k) {
        int64_t b = out.cut ? cuts[i][k] : 0, e = out.cut ? cuts[i][k + 1] : numel[i];
        for (; b < e; b += CHUNK) out.chunks.push_back({k, b, b + CHUNK < e ? b + CHUNK : e});  // empty pieces: none
    }
    out.g_bits.assign(out.chunks.size(), 0u);
    return out;
}

// Reads a share of the next parameter's gradient for its amax while the update, compute-bound,
// leaves memory bandwidth idle: `done` of `total` values assigned to this work item so far.
struct GradientReader {
    const float* g;
    Plan* next;
    int64_t chunk, offset = 0, done = 0;

    void read_until(int64_t target) {
        while (done < target) {
            const Chunk& c = next->chunks[chunk];
            int64_t take = c.end - c.begin - offset < target - done ? c.end - c.begin - offset : target - done;
            uint32_t a = abs_bits_max(g + c.begin + offset, take);
            next->g_bits[chunk] = a > next->g_bits[chunk] ? a : next->g_bits[chunk];
            offset += take;
            done += take;
            if (c.begin + offset == c.end) ++chunk, offset = 0;
        }
    }
};

}  // namespace

extern "C" {

// Steps n_params parameters of one group. Per parameter i: p[i], g[i] (fp32, contiguous, numel[i]
// values), m[i], v[i] (fp32 states when fp8[i] is 0; else E4M3 codes and fp16 values), hp[9 * i ...]
// (lr, 1 - lr * wd, b1, 1 - b1, b2, 1 - b2, 1 / (1 - b1**t), 1 / (1 - b2**t), eps as fp32), and for
// fp8 states n_pieces[i] pieces cut at cuts[i] (n_pieces + 1 offsets; null: one piece, the whole
// tensor) with per-piece m_scale, m_amax, v_scale, v_amax arrays, updated in place. A parameter
// whose gradient or scale bounds are not finite is left untouched (all its pieces), ok[i] = 0.
//
// One parameter at a time: its gradient's amax decides its scales (and whether it steps) before
// any of its values is written. The amax of parameter i + 1's gradient is read during parameter
// i's update, interleaved with it in blocks, so the two overlap (and g[i + 1] is then in cache).
void fp8_adamw_step(int64_t n_params, float** p, const float** g, void** m, void** v, const int64_t* numel,
                    const int32_t* fp8, const int64_t* n_pieces, const int64_t** cuts, float** m_scale,
                    float** m_amax, float** v_scale, float** v_amax, const float* hp, int32_t* ok, int n_threads) {
    constexpr int64_t BLOCK = 1024;  // update values between two reads of the next gradient
    auto read_gradient = [&](Plan& pl, int64_t i) {
        const int64_t n_chunks = static_cast<int64_t>(pl.chunks.size());
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_chunks > 1)
        for (int64_t c = 0; c < n_chunks; ++c)
            pl.g_bits[c] = abs_bits_max(g[i] + pl.chunks[c].begin, pl.chunks[c].end - pl.chunks[c].begin);
    };
    Plan cur = n_params ? plan(0, numel, fp8, n_pieces, cuts) : Plan{};
    if (n_params) read_gradient(cur, 0);
    for (int64_t i = 0; i < n_params; ++i) {
        const float* h = hp + N_HP * i;
        const int64_t pieces = cur.pieces, n_chunks = static_cast<int64_t>(cur.chunks.size());
        std::vector<float> g_amax(pieces, 0.0f);
        std::vector<char> nonempty(pieces, 0);
        for (int64_t c = 0; c < n_chunks; ++c) {
            float a = std::bit_cast<float>(cur.g_bits[c]);
            float& r = g_amax[cur.chunks[c].piece];
            r = std::isnan(a) || a > r ? a : r;  // NaN sticks
            nonempty[cur.chunks[c].piece] = 1;
        }

        // Scales from the bounds: delayed scaling (the amaxes the previous step recorded) plus this
        // gradient's amax bound every new value, so nothing saturates.
        std::vector<float> new_ms(pieces, 1.0f), new_vs(pieces, 1.0f), bound_v(pieces, 0.0f);
        bool good = true;
        for (int64_t k = 0; k < pieces; ++k) {
            float G = g_amax[k];
            if (!fp8[i]) {
                good = good && std::isfinite(G * G);
                continue;
            }
            float bm = h[B1] * m_amax[i][k] * E4M3_ROUND + h[C1] * G;
            float bv = h[B2] * v_amax[i][k] + h[C2] * (G * G);
            good = good && std::isfinite(bm) && std::isfinite(bv);
            new_ms[k] = pow2_scale(bm, E4M3_MAX, m_scale[i][k]);
            new_vs[k] = pow2_scale(bv, FP16_MAX, v_scale[i][k]);
            bound_v[k] = bv;
        }
        ok[i] = good;

        Plan next = i + 1 < n_params ? plan(i + 1, numel, fp8, n_pieces, cuts) : Plan{};
        const int64_t n_next = static_cast<int64_t>(next.chunks.size());
        if (!good || n_chunks == 0) {
            if (i + 1 < n_params) read_gradient(next, i + 1);
            cur = std::move(next);
            continue;
        }

        // The update; work item c also reads the next gradient's chunks [c * n_next / n_chunks, ...).
        std::vector<uint32_t> chunk_amax(n_chunks, 0u);
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_chunks > 1)
        for (int64_t c = 0; c < n_chunks; ++c) {
            const Chunk& ch = cur.chunks[c];
            const int64_t k = ch.piece, first = c * n_next / n_chunks, last = (c + 1) * n_next / n_chunks;
            int64_t share = 0;
            for (int64_t j = first; j < last; ++j) share += next.chunks[j].end - next.chunks[j].begin;
            GradientReader reader{i + 1 < n_params ? g[i + 1] : nullptr, &next, first};
            const int64_t len = ch.end - ch.begin;
            uint32_t amax = 0;
            for (int64_t b = ch.begin; b < ch.end; b += BLOCK) {
                const int64_t n = b + BLOCK < ch.end ? BLOCK : ch.end - b;
                if (!fp8[i]) {
                    step_fp32(p[i] + b, g[i] + b, static_cast<float*>(m[i]) + b, static_cast<float*>(v[i]) + b, n, h);
                } else {
                    uint32_t a = step_fp8(p[i] + b, g[i] + b, static_cast<uint8_t*>(m[i]) + b,
                                          static_cast<uint16_t*>(v[i]) + b, n, h, m_scale[i][k], v_scale[i][k],
                                          new_ms[k], new_vs[k]);
                    amax = a > amax ? a : amax;
                }
                if (share) reader.read_until(share * (b + n - ch.begin) / len);
            }
            chunk_amax[c] = amax;
        }
        if (fp8[i]) {
            std::vector<uint32_t> piece_amax(pieces, 0u);
            for (int64_t c = 0; c < n_chunks; ++c) {
                uint32_t& r = piece_amax[cur.chunks[c].piece];
                r = chunk_amax[c] > r ? chunk_amax[c] : r;
            }
            for (int64_t k = 0; k < pieces; ++k) {
                if (!nonempty[k]) continue;  // an empty piece keeps its scales
                m_amax[i][k] = std::bit_cast<float>(piece_amax[k]) / new_ms[k];
                v_amax[i][k] = bound_v[k];
                m_scale[i][k] = new_ms[k];
                v_scale[i][k] = new_vs[k];
            }
        }
        cur = std::move(next);
    }
}

}  // extern "C"
