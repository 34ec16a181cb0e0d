// The vector operations the kernels use, for the instruction set they are compiled for:
// AVX-512 (x86-64-v4, 16 floats per vector, 32 registers) or AVX2 with FMA (x86-64-v3,
// 8 floats, 16 registers). `python -m moe_tf.kernels.build` picks the -march that the CPU
// at install time has; the kernels' code is written once against these names.

#ifndef MOE_TF_KERNELS_SIMD_H_
#define MOE_TF_KERNELS_SIMD_H_

#include <immintrin.h>

#include <cstdint>

namespace moe_tf {
namespace simd {

#if defined(__AVX512F__)

constexpr int kLanes = 16;
// Vectors per row of a register block: 6 rows x 4 accumulators, 4 loaded vectors and a
// broadcast fit the 32 registers.
constexpr int kBlockVectors = 4;
using Vec = __m512;

inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
// Needs a 64-byte aligned p.
inline void StoreStreaming(float* p, Vec v) { _mm512_stream_ps(p, v); }
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Broadcast(float x) { return _mm512_set1_ps(x); }
inline Vec Add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec Mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec MulAdd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec Max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
// v where test > 0, else 0 (the ReLU's gradient mask).
inline Vec WherePositive(Vec test, Vec v) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(test, Zero(), _CMP_GT_OQ), v);
}
inline float Sum(Vec v) { return _mm512_reduce_add_ps(v); }

// dst [c, r] = src [r, c] for a 16 x 16 block (row strides ls and ld): interleave 32-bit
// then 64-bit pairs of rows, then move 128-bit lanes.
inline void TransposeBlock(const float* src, int64_t ls, float* dst, int64_t ld) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ls);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512d a = _mm512_castps_pd(t[4 * j]), b = _mm512_castps_pd(t[4 * j + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * j + 2]), d = _mm512_castps_pd(t[4 * j + 3]);
    r[4 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // Now r[4 j + q]'s 128-bit lane L holds column 4 L + q of rows 4 j .. 4 j + 3.
  for (int q = 0; q < 4; ++q) {
    const __m512 p0 = _mm512_shuffle_f32x4(r[q], r[4 + q], 0x44);
    const __m512 p1 = _mm512_shuffle_f32x4(r[q], r[4 + q], 0xEE);
    const __m512 p2 = _mm512_shuffle_f32x4(r[8 + q], r[12 + q], 0x44);
    const __m512 p3 = _mm512_shuffle_f32x4(r[8 + q], r[12 + q], 0xEE);
    _mm512_storeu_ps(dst + q * ld, _mm512_shuffle_f32x4(p0, p2, 0x88));
    _mm512_storeu_ps(dst + (4 + q) * ld, _mm512_shuffle_f32x4(p0, p2, 0xDD));
    _mm512_storeu_ps(dst + (8 + q) * ld, _mm512_shuffle_f32x4(p1, p3, 0x88));
    _mm512_storeu_ps(dst + (12 + q) * ld, _mm512_shuffle_f32x4(p1, p3, 0xDD));
  }
}

#elif defined(__AVX2__) && defined(__FMA__)

constexpr int kLanes = 8;
// 6 rows x 2 accumulators, 2 loaded vectors and a broadcast fit the 16 registers.
constexpr int kBlockVectors = 2;
using Vec = __m256;

inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
// Needs a 32-byte aligned p.
inline void StoreStreaming(float* p, Vec v) { _mm256_stream_ps(p, v); }
inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec Broadcast(float x) { return _mm256_set1_ps(x); }
inline Vec Add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec Mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec MulAdd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec Max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec WherePositive(Vec test, Vec v) {
  return _mm256_and_ps(_mm256_cmp_ps(test, Zero(), _CMP_GT_OQ), v);
}
inline float Sum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// dst [c, r] = src [r, c] for an 8 x 8 block: interleave 32-bit pairs of rows, then
// 64-bit pairs, then swap 128-bit halves.
inline void TransposeBlock(const float* src, int64_t ls, float* dst, int64_t ld) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ls);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4 h + q]'s 128-bit half L holds column 4 L + q of rows 4 h .. 4 h + 3.
  for (int h = 0; h < 2; ++h) {
    r[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    r[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    r[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    r[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    _mm256_storeu_ps(dst + q * ld, _mm256_permute2f128_ps(r[q], r[4 + q], 0x20));
    _mm256_storeu_ps(dst + (4 + q) * ld, _mm256_permute2f128_ps(r[q], r[4 + q], 0x31));
  }
}

#else
#error "the moe_tf kernels need AVX-512 or AVX2 with FMA (-march=x86-64-v4 or x86-64-v3)"
#endif

// A weight gradient's columns come in multiples of this (a streaming store writes whole
// aligned vectors; the layer's widths are multiples of 16 for either instruction set).
constexpr int kWidthMultiple = 16;

}  // namespace simd
}  // namespace moe_tf

#endif  // MOE_TF_KERNELS_SIMD_H_
