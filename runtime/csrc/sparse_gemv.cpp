// cscompile CPU backend: sparse GEMV kernels for per-token sparse decoding.
//
// Built on first use by runtime/cpu_kernels.py (torch.utils.cpp_extension.load, ninja,
// -O3 -march=native -fopenmp, cached per CPU). Every kernel reads only the weights a token
// needs and accumulates in fp32; the Python wrappers validate arguments and hold the torch
// references each kernel is tested against.
//
// Layouts (see runtime/pack.py for the sketch / int8 storage contract):
//   dense_gemv   w [N, K] row-major            y[b, n] = s[n] * w[n] . x[b]
//   rows_gemv    w [N, K] row-major, idx [m]   y[b, i] = s[idx_i] * w[idx_i] . x[b]
//   gather_gemv  wt [K, N] input-major, idx [m] (kept inputs)
//                                              y[b, n] = s[n] * sum_i x[b, idx_i] wt[idx_i, n]
//   ffn_sparse   wg, wu [I, H], wd_t [I, H], idx [m] (kept channels)
//                                              y[b] = sum_i silu(wg[j].x[b]) (wu[j].x[b]) wd_t[j]
//   sketch_gemv  packed int32 [N, ceil(K/vpw)], scales fp16 [N, ceil(K/group)]
//                                              y[b, n] = sum_k scale(n,k) (code(n,k) - half) x[b, k]
//   sketch_q8    the same for one row, x rounded to int8 per group, codes as bit planes
//   select / rotate / sketch_select            the batch-1 decode step's selection (top-k and
//                                              its missed share, the sketches' rotation)
//   rmsnorm / rope / attention                 the rest of a batch-1 decode step (decode_step.py)
// Weights are fp32, bf16 (raw uint16 bits; bf16 -> fp32 is a 16-bit shift), int8 (scale per
// output) or int4 (Q4_1 blocks of 32 inputs: dtype 3 of rows, csc_gather_q4 input-major).
// x is fp32 [B, K] contiguous, B small (1..16). Threads: at::get_num_threads(); dense /
// rows / sketch split output rows, gather splits N into contiguous slices (no atomics), the
// fused FFN splits kept channels with per-thread partial outputs summed at the end.
//
// Vector code is AVX2 + FMA (+F16C) with a portable scalar fallback; AVX-512 machines run the
// AVX2 path.
// No torch headers: the library exports a plain C ABI (extern "C" below) that the Python
// wrappers call through ctypes with data pointers, which keeps the first build to seconds.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define CSC_AVX2 1
#else
#define CSC_AVX2 0
#endif

namespace {

using bf16_t = uint16_t;

// ----------------------------------------------------------------------------- scalar helpers
inline float to_f(float v) { return v; }
inline float to_f(int8_t v) { return static_cast<float>(v); }
inline float to_f(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float half_to_f(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: renormalise
    int e = -1;
    do { ++e; man <<= 1; } while (!(man & 0x400u));
    u = sign | ((112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// Threads for a call reading `bytes` of weights: small matrices are not worth a second thread.
inline int threads_for(int nt, int64_t bytes, int64_t units) {
  nt = std::max(1, nt);
  if (bytes < (64 << 10)) nt = 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, units)));
}

// [begin, end) of part t of n items split in nt near-equal contiguous parts
inline void split(int64_t n, int nt, int t, int64_t* b, int64_t* e) {
  int64_t q = n / nt, r = n % nt;
  *b = t * q + std::min<int64_t>(t, r);
  *e = *b + q + (t < r ? 1 : 0);
}

#if CSC_AVX2
// ----------------------------------------------------------------------------- AVX2 helpers
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const int8_t* p) {
  __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// ----------------------------------------------------------------------------- row dots
// One weight row at a time (a single sequential stream: interleaving several short rows
// confuses the hardware prefetcher), with 4 independent FMA chains, while software-prefetching
// the kept row PF_AHEAD rows on, `nxt` (may be null), into L2 at the same pace. Kept rows are
// scattered, so the hardware sees no stream: measured here on 1,152-byte rows (SmolLM2's
// hidden 576 in bf16) read in a random half, prefetching the next row into L1 reached 7.4 GB/s,
// 4 rows ahead into L2 10.7 GB/s (every row in order: 19.9 vs 27 GB/s).
constexpr int64_t PF_AHEAD = 4;
inline void prefetch(const void* p) {
#if CSC_AVX2
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
#else
  __builtin_prefetch(p);
#endif
}

// out[b * ldo] = r[0:K] . x[b * ldx + 0:K], b < BT (BT in 1, 2, 4)
template <typename T, int BT>
inline void dot_row(const T* r, const T* nxt, const float* x, int64_t ldx, int64_t K, float* out,
                    int64_t ldo) {
  constexpr int U = 4 / BT;  // vectors per iteration: BT * U = 4 chains
  constexpr int E = 8 * U;   // inputs per iteration
  constexpr int LINE = 64 / static_cast<int>(sizeof(T));  // inputs per cache line
  int64_t k = 0;
#if CSC_AVX2
  __m256 acc[BT][U];
  for (int b = 0; b < BT; ++b)
    for (int u = 0; u < U; ++u) acc[b][u] = _mm256_setzero_ps();
  for (; k + E <= K; k += E) {
    if (nxt) {
      if constexpr (E >= LINE) {
        for (int l = 0; l < E / LINE; ++l) prefetch(nxt + k + l * LINE);
      } else {
        if ((k & (LINE - 1)) == 0) prefetch(nxt + k);
      }
    }
    for (int u = 0; u < U; ++u) {
      const __m256 w = load8(r + k + 8 * u);
      for (int b = 0; b < BT; ++b)
        acc[b][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * ldx + k + 8 * u), acc[b][u]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 w = load8(r + k);
    for (int b = 0; b < BT; ++b) acc[b][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * ldx + k), acc[b][0]);
  }
  for (int b = 0; b < BT; ++b) {
    __m256 t = acc[b][0];
    for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[b][u]);
    out[b * ldo] = hsum(t);
  }
#else
  (void)nxt;
  for (int b = 0; b < BT; ++b) out[b * ldo] = 0.0f;
#endif
  for (int b = 0; b < BT; ++b) {
    float s = 0.0f;
    for (int64_t kk = k; kk < K; ++kk) s += to_f(r[kk]) * x[b * ldx + kk];
    out[b * ldo] += s;
  }
}

// out[b * ldo] = r . x[b] for all b < B (x [B, K] contiguous); prefetches nxt in the first pass
template <typename T>
inline void dot_row_all(const T* r, const T* nxt, const float* x, int64_t B, int64_t K, float* out,
                        int64_t ldo) {
  if (B == 1) {
    dot_row<T, 1>(r, nxt, x, K, K, out, ldo);
    return;
  }
  int64_t b = 0;
  for (; b + 4 <= B; b += 4) dot_row<T, 4>(r, b ? nullptr : nxt, x + b * K, K, K, out + b * ldo, ldo);
  for (; b + 2 <= B; b += 2) dot_row<T, 2>(r, b ? nullptr : nxt, x + b * K, K, K, out + b * ldo, ldo);
  for (; b < B; ++b) dot_row<T, 1>(r, b ? nullptr : nxt, x + b * K, K, K, out + b * ldo, ldo);
}

// ----------------------------------------------------------------------------- axpy tile
// y[b * ldy + n] += sum_{g < G} c[b * ldc + g] * rows[g][n], n in [n0, n1), b in [0, BT)
// nxt (may be null): G rows prefetched over the same [n0, n1) at the pace these stream.
template <typename T, int G, int BT>
inline void axpy_tile(const T* const* rows, const float* c, int64_t ldc, float* y, int64_t ldy,
                      int64_t n0, int64_t n1, const T* const* nxt = nullptr) {
  constexpr int64_t LINE = 64 / static_cast<int64_t>(sizeof(T));  // outputs per cache line
  int64_t n = n0;
#if CSC_AVX2
  __m256 cv[BT][G];
  for (int b = 0; b < BT; ++b)
    for (int g = 0; g < G; ++g) cv[b][g] = _mm256_set1_ps(c[b * ldc + g]);
  for (; n + 8 <= n1; n += 8) {
    if (nxt && ((n - n0) & (LINE - 1)) == 0)
      for (int g = 0; g < G; ++g) prefetch(nxt[g] + n);
    __m256 w[G];
    for (int g = 0; g < G; ++g) w[g] = load8(rows[g] + n);
    for (int b = 0; b < BT; ++b) {
      float* yp = y + b * ldy + n;
      __m256 a = _mm256_loadu_ps(yp);
      for (int g = 0; g < G; ++g) a = _mm256_fmadd_ps(w[g], cv[b][g], a);
      _mm256_storeu_ps(yp, a);
    }
  }
#endif
  for (; n < n1; ++n)
    for (int b = 0; b < BT; ++b) {
      float a = y[b * ldy + n];
      for (int g = 0; g < G; ++g) a += c[b * ldc + g] * to_f(rows[g][n]);
      y[b * ldy + n] = a;
    }
}

template <typename T, int G>
inline void axpy_rows(const T* const* rows, const float* c, int64_t ldc, int64_t B, float* y,
                      int64_t ldy, int64_t n0, int64_t n1, const T* const* nxt = nullptr) {
  int64_t b = 0;
  for (; b + 2 <= B; b += 2)
    axpy_tile<T, G, 2>(rows, c + b * ldc, ldc, y + b * ldy, ldy, n0, n1, b ? nullptr : nxt);
  for (; b < B; ++b) axpy_tile<T, G, 1>(rows, c + b * ldc, ldc, y + b * ldy, ldy, n0, n1, b ? nullptr : nxt);
}

// ----------------------------------------------------------------------------- rows / dense
// y[b, i] = scale[row_i] * w[row_i] . x[b], row_i = idx ? idx[i] : i, i < M
template <typename T>
void rows_kernel(const T* w, int64_t K, const float* x, int64_t B, const int32_t* idx, int64_t M,
                 const float* scale, float* y, int nthreads) {
  const int nt = threads_for(nthreads, M * K * static_cast<int64_t>(sizeof(T)), M);
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num();
    int64_t i0, i1;
    split(M, nt, t, &i0, &i1);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = idx ? idx[i] : i;
      const int64_t ia = i + PF_AHEAD;
      const T* nxt = ia < i1 ? w + static_cast<int64_t>(idx ? idx[ia] : ia) * K : nullptr;
      dot_row_all<T>(w + row * K, nxt, x, B, K, y + i, M);
      if (scale)
        for (int64_t b = 0; b < B; ++b) y[b * M + i] *= scale[row];
    }
  }
}

// y[0:n] += the nt - 1 partial outputs part [nt - 1, n]; thread t of nt adds its slice (call
// inside the parallel region, after a barrier)
inline void add_partials(float* y, const float* part, int64_t n, int nt, int t) {
  int64_t n0, n1;
  split(n, nt, t, &n0, &n1);
  for (int s = 0; s < nt - 1; ++s)
    for (int64_t q = n0; q < n1; ++q) y[q] += part[s * n + q];
}

// ----------------------------------------------------------------------------- gather
// y[b, n] = scale[n] * sum_{i<m} x[b, k_i] wt[k_i, n], k_i = idx ? idx[i] : i
// Threads split the kept inputs (each streams whole rows, G at a time, into its own partial
// output; thread 0's is y) and sum the partials at the end. Splitting the outputs instead cut
// every row into nt short pieces: at 2 threads SmolLM2's gathers then ran slower than at 1.
template <typename T>
void gather_kernel(const T* wt, int64_t N, const float* x, int64_t B, int64_t K,
                   const int32_t* idx, int64_t m, const float* scale, float* y, int nthreads) {
  constexpr int G = 4;
  // compact coefficients c[b, i] = x[b, k_i]
  std::vector<float> cbuf(static_cast<size_t>(B * std::max<int64_t>(m, 1)));
  float* c = cbuf.data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < m; ++i) c[b * m + i] = x[b * K + (idx ? idx[i] : i)];
  const int64_t ngrp = (m + G - 1) / G;
  const int nt = threads_for(nthreads, m * N * static_cast<int64_t>(sizeof(T)), std::max<int64_t>(ngrp, 1));
  std::vector<float> part(static_cast<size_t>((nt - 1) * B * N));
  auto row = [&](int64_t i) { return wt + static_cast<int64_t>(idx ? idx[i] : i) * N; };
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num();
    float* yt = t == 0 ? y : part.data() + (t - 1) * B * N;
    std::memset(yt, 0, B * N * sizeof(float));
    int64_t g0, g1;
    split(ngrp, nt, t, &g0, &g1);
    const int64_t i1 = std::min(m, g1 * G);
    int64_t i = g0 * G;
    for (; i + G <= i1; i += G) {
      const T *rows[G], *nxt[G];
      for (int g = 0; g < G; ++g) {
        rows[g] = row(i + g);
        // the next group's rows (the last group prefetches its own, harmlessly)
        nxt[g] = row(i + G + g < i1 ? i + G + g : i + g);
      }
      axpy_rows<T, G>(rows, c + i, m, B, yt, N, 0, N, nxt);
    }
    for (; i < i1; ++i) {
      const T* r = row(i);
      axpy_rows<T, 1>(&r, c + i, m, B, yt, N, 0, N);
    }
    if (nt > 1) {
#pragma omp barrier
      add_partials(y, part.data(), B * N, nt, t);
    }
  }
  if (scale)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t n = 0; n < N; ++n) y[b * N + n] *= scale[n];
}

// ----------------------------------------------------------------------------- int4 (Q4)
// A stored row of C values is ceil(C / 32) blocks of 20 bytes (llama.cpp's Q4_1): fp16 scale d,
// fp16 minimum m, then 16 bytes whose byte j holds value 32g + j in its low nibble and
// 32g + 16 + j in its high nibble as a code in [0, 15]; the value is d * code + m (pack.py's
// quantize_q4). Values past C in the last block are padding. One stream per row: the block's
// scale and minimum sit with its codes.
constexpr int64_t Q4_GROUP = 32, Q4_BLOCK = 20;
void quantize_x(const float* x, int64_t K, int64_t group, int8_t* xq, float* sx, float* xsum);
inline int64_t q4_blocks(int64_t c) { return (c + Q4_GROUP - 1) / Q4_GROUP; }
inline float q4_half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_f(h);
}
inline float q4_nibble(const uint8_t* p, int64_t e) {  // code e < 32 of 16 code bytes
  const uint8_t b = p[e & 15];
  return static_cast<float>(e < 16 ? (b & 15) : (b >> 4));
}


// out[b * ldo] = row . x[b], b < BT (BT in 1, 2, 4), with x as llama.cpp's Q8_1 sees it: int8
// per block of 32 (xq, scale sx, xsum = sx * sum(xq): quantize_x), zero-padded to whole blocks.
// Per block: d * sx * (codes . xq), integer dot products on the raw codes (maddubs: u8 codes x
// s8 inputs), plus m * xsum (4 scalar chains); prefetches the next kept row nxt at this pace.
template <int BT>
inline void q4_dot(const uint8_t* row, const uint8_t* nxt, const int8_t* xq, const float* sx,
                   const float* xsum, int64_t nb, float* out, int64_t ldo) {
  const int64_t ldq = nb * Q4_GROUP;
  float corr[BT][4];
  for (int b = 0; b < BT; ++b)
    for (int c = 0; c < 4; ++c) corr[b][c] = 0.0f;
  int64_t g = 0;
#if CSC_AVX2
  constexpr int U = BT == 4 ? 1 : 2;  // independent FMA chains per batch row
  __m256 acc[BT][U];
  for (int b = 0; b < BT; ++b)
    for (int u = 0; u < U; ++u) acc[b][u] = _mm256_setzero_ps();
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (; g < nb; ++g) {
    const uint8_t* blk = row + g * Q4_BLOCK;
    if (nxt && (g & 3) == 0) prefetch(nxt + g * Q4_BLOCK);  // 4 blocks: 80 bytes
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
    const __m256i codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), nib);
    const float d = q4_half(blk), m = q4_half(blk + 2);
    for (int b = 0; b < BT; ++b) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * ldq + g * Q4_GROUP));
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), ones);
      __m256& a = acc[b][g % U];
      a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * sx[b * nb + g]), a);
      corr[b][g & 3] += m * xsum[b * nb + g];
    }
  }
  for (int b = 0; b < BT; ++b) {
    __m256 t = acc[b][0];
    for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[b][u]);
    out[b * ldo] = hsum(t) + ((corr[b][0] + corr[b][1]) + (corr[b][2] + corr[b][3]));
  }
#else
  (void)nxt;
  for (int b = 0; b < BT; ++b) out[b * ldo] = 0.0f;
  for (; g < nb; ++g) {
    const uint8_t* blk = row + g * Q4_BLOCK;
    const float d = q4_half(blk), m = q4_half(blk + 2);
    for (int b = 0; b < BT; ++b) {
      int32_t s = 0;
      for (int64_t j = 0; j < Q4_GROUP; ++j)
        s += static_cast<int32_t>(q4_nibble(blk + 4, j)) * xq[b * ldq + g * Q4_GROUP + j];
      out[b * ldo] += d * sx[b * nb + g] * static_cast<float>(s) + m * xsum[b * nb + g];
    }
  }
#endif
}

// y[b, i] = w[row_i] . q8(x[b]), row_i = idx ? idx[i] : i, i < M; w [N, K] as Q4 rows
void rows_q4_kernel(const uint8_t* w, int64_t K, const float* x, int64_t B, const int32_t* idx, int64_t M,
                    float* y, int nthreads) {
  const int64_t nb = q4_blocks(K), rb = nb * Q4_BLOCK, ldq = nb * Q4_GROUP;
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> sx, xsum;
  xq.assign(static_cast<size_t>(B * ldq), 0);
  sx.resize(static_cast<size_t>(B * nb));
  xsum.resize(static_cast<size_t>(B * nb));
  for (int64_t b = 0; b < B; ++b)
    quantize_x(x + b * K, K, Q4_GROUP, xq.data() + b * ldq, sx.data() + b * nb, xsum.data() + b * nb);
  const int8_t* q = xq.data();
  const float *s = sx.data(), *xs = xsum.data();
  const int nt = threads_for(nthreads, M * rb, M);
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num();
    int64_t i0, i1;
    split(M, nt, t, &i0, &i1);
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* r = w + static_cast<int64_t>(idx ? idx[i] : i) * rb;
      const int64_t ia = i + PF_AHEAD;
      const uint8_t* nxt = ia < i1 ? w + static_cast<int64_t>(idx ? idx[ia] : ia) * rb : nullptr;
      int64_t b = 0;
      for (; b + 4 <= B; b += 4)
        q4_dot<4>(r, b ? nullptr : nxt, q + b * ldq, s + b * nb, xs + b * nb, nb, y + b * M + i, M);
      for (; b + 2 <= B; b += 2)
        q4_dot<2>(r, b ? nullptr : nxt, q + b * ldq, s + b * nb, xs + b * nb, nb, y + b * M + i, M);
      for (; b < B; ++b)
        q4_dot<1>(r, b ? nullptr : nxt, q + b * ldq, s + b * nb, xs + b * nb, nb, y + b * M + i, M);
    }
  }
}

// Input-major int4 ("Q4 columns", pack.py's Q4Cols) keeps W's own blocks: 32 consecutive inputs
// of one output share a scale d and minimum m, as in the row layout, so both layouts hold the
// same numbers (those of the source GGUF, for a Q4_1 model). codes [K, nbn * 16]: input k's
// row, 16 bytes per 32 outputs in the row layout's nibble order; scales fp16 [G, 2, Np]: for
// input group g, d of every output then m of every output (Np = nbn * 32).
// y[b, n] = sum_i x[b, k_i] (d[g_i, n] code[r_i, n] + m[g_i, n]), r_i = rowmap ? rowmap[k_i] : k_i
// the stored row of kept input k_i and g_i = r_i / 32 its group. Kept inputs are bucketed by
// group; per group, t = sum x code (unscaled) over the thread's outputs, each kept row's codes
// streamed whole, then y += d * t + m * (the group's sum of x): scales read once per group.
#if CSC_AVX2
inline void q4_codes(const uint8_t* p, __m256 w[4]) {  // 16 bytes -> 32 codes as floats
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
  w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}
#endif

void gather_q4_kernel(const uint8_t* codes, const uint16_t* scales, int64_t K, int64_t N, const float* x,
                      int64_t B, int64_t ldx, const int32_t* idx, int64_t m, const int32_t* rowmap, float* y,
                      int nthreads) {
  const int64_t nbn = q4_blocks(N), rb = nbn * 16, Np = nbn * Q4_GROUP, G = q4_blocks(K);
  // bucket the kept inputs by group (counting sort): row[i], coefficients c[b * m + i]
  thread_local std::vector<int32_t> row, start, fill;
  thread_local std::vector<float> c, gsum;
  row.resize(static_cast<size_t>(std::max<int64_t>(m, 1)));
  c.resize(static_cast<size_t>(B * std::max<int64_t>(m, 1)));
  start.assign(static_cast<size_t>(G + 1), 0);
  gsum.assign(static_cast<size_t>(B * G), 0.0f);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t k = idx ? idx[i] : i;
    ++start[(rowmap ? rowmap[k] : k) / Q4_GROUP + 1];
  }
  for (int64_t g = 0; g < G; ++g) start[g + 1] += start[g];
  fill.assign(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t k = idx ? idx[i] : i;
    const int32_t r = rowmap ? rowmap[k] : static_cast<int32_t>(k);
    const int64_t at = fill[r / Q4_GROUP]++;
    row[at] = r;
    for (int64_t b = 0; b < B; ++b) {
      c[b * m + at] = x[b * ldx + k];
      gsum[b * G + r / Q4_GROUP] += x[b * ldx + k];
    }
  }
  const int32_t* rows = row.data();
  const float *cf = c.data(), *gs = gsum.data();
  const int32_t* st = start.data();
  const int nt = threads_for(nthreads, m * rb, nbn);
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num();
    int64_t j0, j1;
    split(nbn, nt, t, &j0, &j1);
    const int64_t n0 = std::min(N, j0 * Q4_GROUP), n1 = std::min(N, j1 * Q4_GROUP), w = n1 - n0;
    for (int64_t b = 0; b < B; ++b) std::memset(y + b * N + n0, 0, w * sizeof(float));
    // t[b, 0:w]: one group's unscaled sum over the thread's outputs (in L1); each kept row's
    // codes stream contiguously, 4 rows at a time sharing each load / store of t
    std::vector<float> tbuf(static_cast<size_t>(B * std::max<int64_t>(w, 1)));
    float* tb = tbuf.data();
    for (int64_t g = 0; g < G && w > 0; ++g) {
      const int64_t i0 = st[g], i1 = st[g + 1];
      if (i0 == i1) continue;
      std::fill(tbuf.begin(), tbuf.end(), 0.0f);
      for (int64_t i = i0; i < i1;) {
        const int R = static_cast<int>(std::min<int64_t>(4, i1 - i));
        const uint8_t* rp[4];
        for (int r = 0; r < R; ++r) rp[r] = codes + static_cast<int64_t>(rows[i + r]) * rb;
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t n = j * Q4_GROUP, cnt = std::min(Q4_GROUP, N - n);
#if CSC_AVX2
          if (cnt == Q4_GROUP) {
            for (int64_t b = 0; b < B; ++b) {
              float* tp = tb + b * w + (n - n0);
              __m256 a[4];
              for (int u = 0; u < 4; ++u) a[u] = _mm256_loadu_ps(tp + 8 * u);
              for (int r = 0; r < R; ++r) {
                __m256 cw[4];
                q4_codes(rp[r] + j * 16, cw);
                const __m256 cv = _mm256_set1_ps(cf[b * m + i + r]);
                for (int u = 0; u < 4; ++u) a[u] = _mm256_fmadd_ps(cw[u], cv, a[u]);
              }
              for (int u = 0; u < 4; ++u) _mm256_storeu_ps(tp + 8 * u, a[u]);
            }
            continue;
          }
#endif
          for (int64_t b = 0; b < B; ++b)
            for (int r = 0; r < R; ++r)
              for (int64_t e = 0; e < cnt; ++e)
                tb[b * w + (n - n0) + e] += cf[b * m + i + r] * q4_nibble(rp[r] + j * 16, e);
        }
        i += R;
      }
      // y += d * t + m * (the group's sum of x)
      const uint16_t* dg = scales + g * 2 * Np;
      const uint16_t* mg = dg + Np;
      for (int64_t b = 0; b < B; ++b) {
        const float sgb = gs[b * G + g];
        float* yb = y + b * N;
        const float* tp = tb + b * w - n0;
        int64_t n = n0;
#if CSC_AVX2
        const __m256 sv = _mm256_set1_ps(sgb);
        for (; n + 8 <= n1; n += 8) {
          const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dg + n)));
          const __m256 mm = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mg + n)));
          _mm256_storeu_ps(yb + n, _mm256_fmadd_ps(d, _mm256_loadu_ps(tp + n),
                                                   _mm256_fmadd_ps(mm, sv, _mm256_loadu_ps(yb + n))));
        }
#endif
        for (; n < n1; ++n) yb[n] += half_to_f(dg[n]) * tp[n] + half_to_f(mg[n]) * sgb;
      }
    }
  }
}

// ----------------------------------------------------------------------------- fused FFN
// y[b] = sum_i silu(wg[j_i] . x[b]) * (wu[j_i] . x[b]) * wd_t[j_i], j_i = idx ? idx[i] : i
template <typename T>
void ffn_kernel(const T* wg, const T* wu, const T* wd, int64_t H, const float* x, int64_t B,
                const int32_t* idx, int64_t m, float* y, int nthreads) {
  constexpr int G = 4;
  const int64_t ngrp = (m + G - 1) / G;
  const int nt = threads_for(nthreads, 3 * m * H * static_cast<int64_t>(sizeof(T)), std::max<int64_t>(ngrp, 1));
  // thread 0 accumulates into y, the others into private partials summed at the end
  std::vector<float> part(static_cast<size_t>((nt - 1) * B * H));
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num();
    float* yt = t == 0 ? y : part.data() + (t - 1) * B * H;
    std::memset(yt, 0, B * H * sizeof(float));
    int64_t g0, g1;
    split(ngrp, nt, t, &g0, &g1);
    std::vector<float> gv(B * G), uv(B * G), hv(B * G);
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t i0 = grp * G;
      const int cnt = static_cast<int>(std::min<int64_t>(G, m - i0));
      const T* rd[G];
      for (int r = 0; r < cnt; ++r) {
        const int64_t j = idx ? idx[i0 + r] : i0 + r;
        // the kept channel PF_AHEAD on in this thread, prefetched while this one streams
        const int64_t inext = i0 + r + PF_AHEAD < std::min(m, g1 * G) ? i0 + r + PF_AHEAD : -1;
        const int64_t jn = inext < 0 ? -1 : (idx ? idx[inext] : inext);
        dot_row_all<T>(wg + j * H, jn < 0 ? nullptr : wg + jn * H, x, B, H, gv.data() + r, G);
        dot_row_all<T>(wu + j * H, jn < 0 ? nullptr : wu + jn * H, x, B, H, uv.data() + r, G);
        rd[r] = wd + j * H;
      }
      for (int64_t b = 0; b < B; ++b)
        for (int r = 0; r < cnt; ++r) hv[b * G + r] = silu(gv[b * G + r]) * uv[b * G + r];
      if (cnt == G) {
        const T* nd[G];  // the next group's down rows
        for (int r = 0; r < G; ++r) {
          const int64_t in = grp + 1 < g1 && i0 + G + r < m ? i0 + G + r : i0 + r;
          nd[r] = wd + (idx ? idx[in] : in) * H;
        }
        axpy_rows<T, G>(rd, hv.data(), G, B, yt, H, 0, H, nd);
      } else {
        for (int r = 0; r < cnt; ++r) axpy_rows<T, 1>(rd + r, hv.data() + r, G, B, yt, H, 0, H);
      }
    }
    if (nt > 1) {
#pragma omp barrier
      add_partials(y, part.data(), B * H, nt, t);
    }
  }
}

// ----------------------------------------------------------------------------- sketch
// Packed b-bit codes: input k of a row is bits (k % vpw) * b .. of word k / vpw (low first);
// value = scale[k / group] * (code - (2^b - 1) / 2). The vector path walks a row in blocks:
// one word (vpw = 32 / 16 / 8 inputs) for 1 / 2 / 4 bits, four words (40 inputs) for 3 bits,
// 8 inputs per vector: a variable shift puts each lane's code in its low bits, then a
// vpermps lookup in an 8-entry table of (code - half) decodes 1..3 bits in one instruction
// (it reads only a lane's low 3 bits), 4 bits mask + convert. Groups must be multiples of 8.
template <int BITS>
struct Sketch {
  static constexpr int VPW = 32 / BITS;
  static constexpr uint32_t MASK = (1u << BITS) - 1;
  static constexpr float HALF = static_cast<float>((1 << BITS) - 1) / 2.0f;
  static constexpr int BLK = BITS == 3 ? 40 : VPW;  // inputs per block
  static constexpr int WPB = BITS == 3 ? 4 : 1;     // words per block
  static constexpr int NV = BLK / 8;                // vectors per block
#ifdef CSC_SKETCH_LUT
  static constexpr bool USE_LUT = true;
#else
  static constexpr bool USE_LUT = false;
#endif

  static inline float scalar(const int32_t* words, int64_t k) {
    uint32_t w = static_cast<uint32_t>(words[k / VPW]);
    return static_cast<float>((w >> ((k % VPW) * BITS)) & MASK) - HALF;
  }

#if CSC_AVX2
  static inline __m256 table() {
    alignas(32) float t[8];
    for (int i = 0; i < 8; ++i) t[i] = static_cast<float>(i & MASK) - HALF;
    return _mm256_load_ps(t);
  }
  // the block's words, from p (WPB readable words)
  static inline __m256i load_block(const int32_t* p) {
    if constexpr (BITS == 3)
      return _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    else
      return _mm256_set1_epi32(*p);
  }
  // (code - half) of the block's inputs 8j .. 8j + 7
  static inline __m256 decode(__m256i wv, int j, __m256 lut) {
    if constexpr (BITS == 3) {
      // lane i of vector j: input 8j + i, word (8j + i) / 10, shift 3 * ((8j + i) % 10)
      alignas(32) static const int32_t WIDX[5][8] = {{0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, 1, 1, 1, 1, 1, 1},
                                                     {1, 1, 1, 1, 2, 2, 2, 2}, {2, 2, 2, 2, 2, 2, 3, 3},
                                                     {3, 3, 3, 3, 3, 3, 3, 3}};
      alignas(32) static const int32_t SH[5][8] = {{0, 3, 6, 9, 12, 15, 18, 21},
                                                   {24, 27, 0, 3, 6, 9, 12, 15},
                                                   {18, 21, 24, 27, 0, 3, 6, 9},
                                                   {12, 15, 18, 21, 24, 27, 0, 3},
                                                   {6, 9, 12, 15, 18, 21, 24, 27}};
      __m256i w = _mm256_permutevar8x32_epi32(wv, _mm256_load_si256(reinterpret_cast<const __m256i*>(WIDX[j])));
      w = _mm256_srlv_epi32(w, _mm256_load_si256(reinterpret_cast<const __m256i*>(SH[j])));
      if constexpr (USE_LUT) return _mm256_permutevar8x32_ps(lut, w);
      return _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(MASK))), _mm256_set1_ps(HALF));
    } else {
      const __m256i sh = _mm256_add_epi32(
          _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS),
          _mm256_set1_epi32(j * 8 * BITS));
      const __m256i w = _mm256_srlv_epi32(wv, sh);
      if constexpr (BITS == 4 || !USE_LUT)
        return _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(MASK))),
                             _mm256_set1_ps(HALF));
      else
        return _mm256_permutevar8x32_ps(lut, w);
    }
  }

  // Calls f(k, vals) for every whole vector of inputs [k, k + 8) of R rows (vals[r]: their
  // (code - half)), in order; returns the first input not visited (K rounded down to 8).
  // pf (may be null): the next rows' words, prefetched at the pace this walk reads (R rows).
  template <int R, typename F>
  static inline int64_t walk(const int32_t* const* words, int64_t K, int64_t W, const int32_t* pf, F&& f) {
    const __m256 lut = table();
    const int64_t nfull = K / BLK;
    int64_t k = 0;
    __m256i wv[R];
    __m256 vals[R];
    for (int64_t blk = 0; blk < nfull; ++blk) {
      if (pf) prefetch(pf + blk * WPB * R);
      for (int r = 0; r < R; ++r) wv[r] = load_block(words[r] + blk * WPB);
      for (int j = 0; j < NV; ++j, k += 8) {
        for (int r = 0; r < R; ++r) vals[r] = decode(wv[r], j, lut);
        f(k, vals);
      }
    }
    const int ntail = static_cast<int>((K - k) / 8);
    if (ntail > 0) {  // whole vectors of the last, partial block: its words padded with zeros
      for (int r = 0; r < R; ++r) {
        alignas(16) int32_t tmp[4] = {0, 0, 0, 0};
        for (int64_t q = nfull * WPB; q < std::min<int64_t>(W, nfull * WPB + WPB); ++q) tmp[q - nfull * WPB] = words[r][q];
        wv[r] = load_block(tmp);
      }
      for (int j = 0; j < ntail; ++j, k += 8) {
        for (int r = 0; r < R; ++r) vals[r] = decode(wv[r], j, lut);
        f(k, vals);
      }
    }
    return k;
  }
#endif
};

// out[b * ldo + r] = dequant(row r) . x[b], r < R, b < BT, without a dequantized copy
template <int BITS, int R, int BT>
inline void sketch_tile(const int32_t* const* words, const uint16_t* const* sc, int64_t group,
                        const float* x, int64_t ldx, int64_t K, int64_t W, float* out,
                        int64_t ldo, const int32_t* pf = nullptr) {
  using S = Sketch<BITS>;
  int64_t k = 0;
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < BT; ++b) out[b * ldo + r] = 0.0f;
#if CSC_AVX2
  if (group % 8 == 0) {
    __m256 tot[R][BT], acc[R][BT];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < BT; ++b) tot[r][b] = acc[r][b] = _mm256_setzero_ps();
    int64_t gi = 0, gend = group;
    auto flush = [&]() {
      for (int r = 0; r < R; ++r) {
        const __m256 s = _mm256_set1_ps(half_to_f(sc[r][gi]));
        for (int b = 0; b < BT; ++b) {
          tot[r][b] = _mm256_fmadd_ps(s, acc[r][b], tot[r][b]);
          acc[r][b] = _mm256_setzero_ps();
        }
      }
    };
    k = S::template walk<R>(words, K, W, pf, [&](int64_t kk, const __m256* vals) {
      __m256 xv[BT];
      for (int b = 0; b < BT; ++b) xv[b] = _mm256_loadu_ps(x + b * ldx + kk);
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < BT; ++b) acc[r][b] = _mm256_fmadd_ps(vals[r], xv[b], acc[r][b]);
      if (kk + 8 == gend) {
        flush();
        ++gi;
        gend += group;
      }
    });
    if (k > gend - group) flush();  // a group cut short by the end of the vector path
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < BT; ++b) out[b * ldo + r] = hsum(tot[r][b]);
  }
#else
  (void)W;
#endif
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < BT; ++b) {
      float acc = 0.0f;
      for (int64_t kk = k; kk < K; ++kk)
        acc += half_to_f(sc[r][kk / group]) * S::scalar(words[r], kk) * x[b * ldx + kk];
      out[b * ldo + r] += acc;
    }
}

// one row dequantized to fp32 (scale applied): buf[0:K]
template <int BITS>
inline void sketch_decode_row(const int32_t* words, const uint16_t* sc, int64_t group, int64_t K,
                              int64_t W, float* buf) {
  using S = Sketch<BITS>;
  int64_t k = 0;
#if CSC_AVX2
  if (group % 8 == 0) {
    int64_t gi = 0, gend = group;
    __m256 s = _mm256_set1_ps(half_to_f(sc[0]));
    k = S::template walk<1>(&words, K, W, nullptr, [&](int64_t kk, const __m256* vals) {
      _mm256_storeu_ps(buf + kk, _mm256_mul_ps(s, vals[0]));
      if (kk + 8 == gend && kk + 8 < K) {
        ++gi;
        gend += group;
        s = _mm256_set1_ps(half_to_f(sc[gi]));
      }
    });
  }
#else
  (void)W;
#endif
  for (; k < K; ++k) buf[k] = half_to_f(sc[k / group]) * S::scalar(words, k);
}

template <int BITS>
void sketch_kernel(const int32_t* packed, int64_t W, const uint16_t* scales, int64_t G,
                   const float* x, int64_t B, int64_t N, int64_t K, int64_t group, float* y, int nthreads) {
  constexpr int R = 4;
  const int64_t nblk = (N + R - 1) / R;
  const int nt = threads_for(nthreads, N * (W * 4 + G * 2), nblk);
  const bool buffered = B > 2;  // decode once, then an fp32 dot per batch row
#pragma omp parallel num_threads(nt)
  {
    int t = omp_get_thread_num();
    int64_t b0, b1;
    split(nblk, nt, t, &b0, &b1);
    std::vector<float> bufv(buffered ? static_cast<size_t>(R * K) : 0);
    std::vector<float> outv(static_cast<size_t>(B * R));
    float* out = outv.data();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * R;
      const int cnt = static_cast<int>(std::min<int64_t>(R, N - n0));
      const int32_t* wr[R];
      const uint16_t* sr[R];
      for (int r = 0; r < cnt; ++r) {
        wr[r] = packed + (n0 + r) * W;
        sr[r] = scales + (n0 + r) * G;
      }
      if (buffered) {
        for (int r = 0; r < cnt; ++r) {
          sketch_decode_row<BITS>(wr[r], sr[r], group, K, W, bufv.data() + r * K);
          dot_row_all<float>(bufv.data() + r * K, nullptr, x, B, K, out + r, R);
        }
      } else if (cnt == R && B == 1) {
        // rows are contiguous: prefetch the next block of R rows while this one streams
        const int32_t* pf = blk + 1 < b1 ? packed + (n0 + R) * W : nullptr;
        sketch_tile<BITS, R, 1>(wr, sr, group, x, K, K, W, out, R, pf);
      } else if (B == 2) {
        int r = 0;
        for (; r + 2 <= cnt; r += 2) sketch_tile<BITS, 2, 2>(wr + r, sr + r, group, x, K, K, W, out + r, R);
        for (; r < cnt; ++r) {
          sketch_tile<BITS, 1, 2>(wr + r, sr + r, group, x, K, K, W, out + r, R);
        }
      } else {  // B == 1, a last partial block of rows
        for (int r = 0; r < cnt; ++r) sketch_tile<BITS, 1, 1>(wr + r, sr + r, group, x, K, K, W, out + r, R);
      }
      for (int64_t b = 0; b < B; ++b)
        for (int r = 0; r < cnt; ++r) y[b * N + n0 + r] = out[b * R + r];
    }
  }
}

// ----------------------------------------------------------------------------- sketch, int8 x
// The batch-1 sketch GEMV as integer dot products (as llama.cpp's k-quants do): x is quantized
// to int8 per weight group, each 32 codes are decoded to bytes and _mm256_maddubs_epi16
// multiplies 32 code / x pairs per instruction. The float kernel above spends ~0.2 ns per
// weight decoding and converting codes, more than reading a bf16 weight costs; this one is
// meant to run at the packed bytes' read speed. Codes come in "planes" (made from pack.py's
// words by cpu_kernels.sketch_planes, the same bits per weight), per 64 inputs:
//   16 bytes of the codes' low 2 bits: input 32j + 16h + i at bits 2(2j + h) of byte i;
//   3 bits: 8 bytes of bit 2: input 32j + 8q + r at bit 4j + q of byte r;
//   4 bits: 16 bytes of bits 2-3, laid out like the low bits.
// K must be a multiple of 64 and the group of 32.
template <int BITS>
struct Planes {
  static constexpr int PB = BITS * 8;  // bytes per 64 inputs
  static constexpr float HALF = static_cast<float>((1 << BITS) - 1) / 2.0f;

  static inline int code(const uint8_t* row, int64_t k) {
    const uint8_t* p = row + (k / 64) * PB;
    const int t = static_cast<int>(k % 64), j = t / 32, b = t % 32;
    const int sh = 2 * (2 * j + b / 16);
    int c = (p[b % 16] >> sh) & 3;
    if constexpr (BITS == 3) c |= ((p[16 + b % 8] >> (4 * j + b / 8)) & 1) << 2;
    if constexpr (BITS == 4) c |= ((p[16 + b % 16] >> sh) & 3) << 2;
    return c;
  }
};

// per group g of x [K]: sx[g] = max|x| / 127, xq = round(x / sx), xsum[g] = sx[g] * sum(xq)
void quantize_x(const float* x, int64_t K, int64_t group, int8_t* xq, float* sx, float* xsum) {
  for (int64_t g0 = 0, g = 0; g0 < K; g0 += group, ++g) {
    const int64_t g1 = std::min(K, g0 + group);
    float amax = 0.0f;
    for (int64_t k = g0; k < g1; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float s = amax > 0.0f ? amax / 127.0f : 1.0f, inv = 1.0f / s;
    int32_t sum = 0;
    for (int64_t k = g0; k < g1; ++k) {
      const int v = static_cast<int>(std::nearbyint(x[k] * inv));
      xq[k] = static_cast<int8_t>(std::max(-127, std::min(127, v)));
      sum += xq[k];
    }
    sx[g] = s;
    xsum[g] = s * static_cast<float>(sum);
  }
}

// out[r] = dequant(rows[r]) . x for R rows at once (sharing each x load; R in 1..4)
template <int BITS, int R>
void sketch_q8_rows(const uint8_t* const* rows, const uint16_t* const* sc, const int8_t* xq,
                    const float* sx, const float* xsum, int64_t K, int64_t group, float* out) {
  using P = Planes<BITS>;
  float tot[R], off[R];
  for (int r = 0; r < R; ++r) tot[r] = off[r] = 0.0f;  // off: sum scale_g xsum_g
#if CSC_AVX2
  const __m256i m3 = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4), ones = _mm256_set1_epi16(1);
  const __m256i shift[2] = {_mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2),
                            _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)};
  // byte b of sub-block j tests bit 4j + b / 8 of the bit-2 plane
  const __m256i hmask[2] = {
      _mm256_setr_epi64x(0x0101010101010101LL, 0x0202020202020202LL, 0x0404040404040404LL,
                         0x0808080808080808LL),
      _mm256_setr_epi64x(0x1010101010101010LL, 0x2020202020202020LL, 0x4040404040404040LL,
                         static_cast<long long>(0x8080808080808080ULL))};
  __m256 facc[R];
  __m256i iacc[R], lo[R], hi[R];
  for (int r = 0; r < R; ++r) {
    facc[r] = _mm256_setzero_ps();
    iacc[r] = lo[r] = hi[r] = _mm256_setzero_si256();
  }
  const int64_t per_group = group / 32;  // sub-blocks of 32 inputs per scale group
  int64_t left = per_group, g = 0;       // (no division in the loop: it would dominate)
  for (int64_t t = 0; t < K / 32; ++t) {
    const int j = static_cast<int>(t & 1);
    if (j == 0) {  // a new 64-input block: its planes
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = rows[r] + (t >> 1) * P::PB;
        lo[r] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        if constexpr (BITS == 3) {
          int64_t h8;
          std::memcpy(&h8, p + 16, 8);
          hi[r] = _mm256_set1_epi64x(h8);
        } else if constexpr (BITS == 4) {
          hi[r] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
        }
      }
    }
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * t));
    for (int r = 0; r < R; ++r) {
      __m256i q = _mm256_and_si256(_mm256_srlv_epi32(lo[r], shift[j]), m3);
      if constexpr (BITS == 3) {
        const __m256i h = _mm256_cmpeq_epi8(_mm256_and_si256(hi[r], hmask[j]), hmask[j]);
        q = _mm256_or_si256(q, _mm256_and_si256(h, four));
      } else if constexpr (BITS == 4) {
        q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srlv_epi32(hi[r], shift[j]), m3), 2));
      }
      iacc[r] = _mm256_add_epi32(iacc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones));
    }
    if (--left == 0 || t + 1 == K / 32) {  // a group ends (or the row, mid-group)
      for (int r = 0; r < R; ++r) {
        const float f = half_to_f(sc[r][g]);
        facc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r]), _mm256_set1_ps(f * sx[g]), facc[r]);
        off[r] += f * xsum[g];
        iacc[r] = _mm256_setzero_si256();
      }
      left = per_group;
      ++g;
    }
  }
  for (int r = 0; r < R; ++r) tot[r] = hsum(facc[r]);
#else
  for (int r = 0; r < R; ++r)
    for (int64_t g0 = 0, g = 0; g0 < K; g0 += group, ++g) {
      int32_t dot = 0;
      for (int64_t k = g0; k < std::min(K, g0 + group); ++k) dot += P::code(rows[r], k) * xq[k];
      const float f = half_to_f(sc[r][g]);
      tot[r] += f * sx[g] * static_cast<float>(dot);
      off[r] += f * xsum[g];
    }
#endif
  for (int r = 0; r < R; ++r) out[r] = tot[r] - P::HALF * off[r];
}

template <int BITS>
void sketch_q8_kernel(const uint8_t* planes, int64_t N, int64_t K, const uint16_t* scales,
                      int64_t G, int64_t group, const int8_t* xq, const float* sx,
                      const float* xsum, float* y, int nthreads) {
  constexpr int R = 4;
  const int64_t row_bytes = K / 64 * Planes<BITS>::PB, nblk = (N + R - 1) / R;
  const int nt = threads_for(nthreads, N * (row_bytes + G * 2), nblk);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t n0 = blk * R;
    const uint8_t* rows[R];
    const uint16_t* sc[R];
    const int cnt = static_cast<int>(std::min<int64_t>(R, N - n0));
    for (int r = 0; r < cnt; ++r) {
      rows[r] = planes + (n0 + r) * row_bytes;
      sc[r] = scales + (n0 + r) * G;
    }
    if (cnt == R) {
      sketch_q8_rows<BITS, R>(rows, sc, xq, sx, xsum, K, group, y + n0);
    } else {
      for (int r = 0; r < cnt; ++r) sketch_q8_rows<BITS, 1>(rows + r, sc + r, xq, sx, xsum, K, group, y + n0 + r);
    }
  }
}

// ----------------------------------------------------------------------------- selection
// The batch-1 decode step's measurements, which in torch cost more than the GEMVs they steer
// (a dozen small ops each): top-k of a score as sorted indices, the rotation of the sketches,
// and the sketch estimate of an FFN's |silu(g) u| with its top-k.

// Top-k as sorted indices: the k-th largest is one nth_element over uint32 keys (float_key),
// and one scan in index order emits the kept (every key above it, then ties from the lowest
// index): no sort, no indirect compares (those took ~27 us for n = 576..1536).
// Order-preserving uint32 key of a float: non-negative floats order as their bits; with the
// sign flipped (and negatives' bits inverted) every float does.
inline uint32_t float_key(float v, bool any_sign) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return any_sign ? (u & 0x80000000u ? ~u : u | 0x80000000u) : u;
}

// Sorted ascending indices of the k largest keys (ties: lower index first) into idx, k <= n.
void topk_keys(const float* v, int64_t n, int64_t k, bool any_sign, int32_t* idx) {
  if (k <= 0) return;
  thread_local std::vector<uint32_t> keys;
  keys.resize(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = float_key(v[i], any_sign);
  std::nth_element(keys.begin(), keys.begin() + (n - k), keys.end());
  const uint32_t t = keys[n - k];  // the k-th largest key
  int64_t above = 0;
  for (int64_t i = n - k + 1; i < n; ++i) above += keys[i] > t;  // nth_element: all >= t there
  int64_t ties = k - above, out = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = float_key(v[i], any_sign);
    if (key > t || (key == t && ties-- > 0)) idx[out++] = static_cast<int32_t>(i);
  }
}

double topk_sorted(const float* score, int64_t n, int64_t k, int32_t* idx) {
  k = std::min(k, n);
  double total = 0.0, kept = 0.0;
  for (int64_t i = 0; i < n; ++i) total += static_cast<double>(score[i]) * score[i];
  if (k <= 0) return 1.0;
  topk_keys(score, n, k, false, idx);
  for (int64_t i = 0; i < k; ++i) kept += static_cast<double>(score[idx[i]]) * score[idx[i]];
  return std::max(0.0, 1.0 - kept / std::max(total, 1e-30));
}

// y = blockdiag(H_b / sqrt(b)) (signs * x[perm]) for one row of n (b a power of two dividing n)
void rotate_kernel(const float* x, int64_t n, const int32_t* perm, const float* signs, int64_t b,
                   float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[perm[i]] * signs[i];
  const float norm = 1.0f / std::sqrt(static_cast<float>(b));
  for (int64_t base = 0; base < n; base += b) {
    float* v = y + base;
    for (int64_t h = 1; h < b; h <<= 1)  // in-place fast Walsh-Hadamard (Sylvester order)
      for (int64_t i = 0; i < b; i += h << 1)
        for (int64_t j = i; j < i + h; ++j) {
          const float a = v[j], c = v[j + h];
          v[j] = a + c;
          v[j + h] = a - c;
        }
    for (int64_t i = 0; i < b; ++i) v[i] *= norm;
  }
}

// ----------------------------------------------------------------------------- decode loop
// The rest of a batch-1 decode step (runtime/decode_step.py): each is one call here where torch
// runs 5-15 small ops (~30-60 us at SmolLM2's sizes, as much as a layer's sparse GEMVs).

// y[r] = x[r] * w / sqrt(mean(x[r]^2) + eps) for rows of n (LlamaRMSNorm, fp32)
void rmsnorm_kernel(const float* x, int64_t rows, int64_t n, const float* w, float eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / n) + eps);
    for (int64_t i = 0; i < n; ++i) yr[i] = w[i] * (xr[i] * inv);
  }
}

// x [heads, d] rotated in place by rotate-half RoPE with cos, sin [d] (both halves given)
void rope_kernel(float* x, int64_t heads, int64_t d, const float* cos, const float* sin) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * d;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#if CSC_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// o [Hq, d] = softmax(scale q[h] K[g]^T) V[g] for one query row, g = h / (Hq / Hkv) (GQA);
// K, V [Hkv, L, d] contiguous. Heads split across threads when the context is long.
void attention_kernel(const float* q, int64_t Hq, int64_t Hkv, int64_t d, const float* K,
                      const float* V, int64_t L, float scale, float* o, int nthreads) {
  const int64_t per = Hq / Hkv;
  const int nt = threads_for(nthreads, 2 * Hkv * L * d * static_cast<int64_t>(sizeof(float)),
                             Hq);
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> p(L);
#pragma omp for schedule(static)
    for (int64_t h = 0; h < Hq; ++h) {
      const float* qh = q + h * d;
      const float* Kg = K + (h / per) * L * d;
      const float* Vg = V + (h / per) * L * d;
      float mx = -INFINITY;
      for (int64_t l = 0; l < L; ++l) {
        p[l] = dot_f32(qh, Kg + l * d, d) * scale;
        mx = std::max(mx, p[l]);
      }
      float tot = 0.0f;
      for (int64_t l = 0; l < L; ++l) tot += (p[l] = std::exp(p[l] - mx));
      float* oh = o + h * d;
      for (int64_t i = 0; i < d; ++i) oh[i] = 0.0f;
      for (int64_t l = 0; l < L; ++l) {
        const float c = p[l] / tot;
        const float* vl = Vg + l * d;
        for (int64_t i = 0; i < d; ++i) oh[i] += c * vl[i];
      }
    }
  }
}

// ----------------------------------------------------------------------------- bandwidth
int64_t read_bytes_kernel(const uint8_t* p, int64_t n, int nthreads) {
  const int nt = threads_for(nthreads, n, std::max<int64_t>(1, n >> 16));
  int64_t total = 0;
#pragma omp parallel num_threads(nt) reduction(+ : total)
  {
    int t = omp_get_thread_num();
    int64_t c0, c1;
    split(n / 64, nt, t, &c0, &c1);  // whole cache lines
    int64_t s = 0;
    int64_t i = c0 * 64;
    const int64_t e = c1 * 64;
#if CSC_AVX2
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256(), z = _mm256_setzero_si256();
    for (; i + 128 <= e; i += 128) {
      __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
      __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32));
      __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64));
      __m256i v3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96));
      a0 = _mm256_add_epi64(a0, _mm256_sad_epu8(v0, z));
      a1 = _mm256_add_epi64(a1, _mm256_sad_epu8(v1, z));
      a0 = _mm256_add_epi64(a0, _mm256_sad_epu8(v2, z));
      a1 = _mm256_add_epi64(a1, _mm256_sad_epu8(v3, z));
    }
    alignas(32) int64_t l[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(l), _mm256_add_epi64(a0, a1));
    s = l[0] + l[1] + l[2] + l[3];
#endif
    for (; i < e; ++i) s += p[i];
    if (t == nt - 1)
      for (int64_t q = (n / 64) * 64; q < n; ++q) s += p[q];
    total += s;
  }
  return total;
}


}  // namespace

// ----------------------------------------------------------------------------- C ABI
// dtype codes: 0 float32, 1 bfloat16, 2 int8. Return 0 on success, 1 + i when idx[i] is out of
// range (nothing is computed then). Outputs are written in full (no need to zero them).
namespace {
inline int64_t check_idx(const int32_t* idx, int64_t m, int64_t limit) {
  if (!idx) return 0;
  for (int64_t i = 0; i < m; ++i)
    if (idx[i] < 0 || idx[i] >= limit) return i + 1;
  return 0;
}
}  // namespace

extern "C" {

int csc_abi_version() { return 5; }
int csc_has_avx2() { return CSC_AVX2; }

// y [B, M] = x [B, K] @ w[idx].T (* scale[idx]); w [N, K]; idx null -> rows 0..M-1
int64_t csc_rows(int dtype, const void* w, int64_t N, int64_t K, const float* x, int64_t B,
                 const int32_t* idx, int64_t M, const float* scale, float* y, int nthreads) {
  if (int64_t bad = check_idx(idx, M, N)) return bad;
  if (B <= 0 || M <= 0) return 0;
  switch (dtype) {
    case 0: rows_kernel(static_cast<const float*>(w), K, x, B, idx, M, scale, y, nthreads); break;
    case 1: rows_kernel(static_cast<const bf16_t*>(w), K, x, B, idx, M, scale, y, nthreads); break;
    case 3: rows_q4_kernel(static_cast<const uint8_t*>(w), K, x, B, idx, M, y, nthreads); break;
    default: rows_kernel(static_cast<const int8_t*>(w), K, x, B, idx, M, scale, y, nthreads); break;
  }
  return 0;
}

// y [B, N] = x[:, idx] @ wt[idx] (* scale); wt [K, N]; idx null -> inputs 0..m-1
int64_t csc_gather(int dtype, const void* wt, int64_t K, int64_t N, const float* x, int64_t B,
                   const int32_t* idx, int64_t m, const float* scale, float* y, int nthreads) {
  if (int64_t bad = check_idx(idx, m, K)) return bad;
  if (B <= 0 || N <= 0) return 0;
  switch (dtype) {
    case 0: gather_kernel(static_cast<const float*>(wt), N, x, B, K, idx, m, scale, y, nthreads); break;
    case 1: gather_kernel(static_cast<const bf16_t*>(wt), N, x, B, K, idx, m, scale, y, nthreads); break;
    default: gather_kernel(static_cast<const int8_t*>(wt), N, x, B, K, idx, m, scale, y, nthreads); break;
  }
  return 0;
}

// y [B, N] = x[:, idx] @ W^T[rowmap[idx]] for int4 columns (codes [K, nbn * 16], scales fp16
// [G, 2, Np]); idx null -> inputs 0..m-1, rowmap null -> the identity
int64_t csc_gather_q4(const uint8_t* codes, const uint16_t* scales, int64_t K, int64_t N, const float* x,
                      int64_t B, const int32_t* idx, int64_t m, const int32_t* rowmap, float* y, int nthreads) {
  if (int64_t bad = check_idx(idx, m, K)) return bad;
  if (rowmap)
    for (int64_t k = 0; k < K; ++k)
      if (rowmap[k] < 0 || rowmap[k] >= K) return -2;
  if (B <= 0 || N <= 0) return 0;
  gather_q4_kernel(codes, scales, K, N, x, B, K, idx, m, rowmap, y, nthreads);
  return 0;
}

// y [B, H] = sum_i silu(wg[j_i] . x) (wu[j_i] . x) wd_t[j_i]; weights [I, H]; idx null -> 0..m-1
int64_t csc_ffn(int dtype, const void* wg, const void* wu, const void* wd, int64_t I, int64_t H,
                const float* x, int64_t B, const int32_t* idx, int64_t m, float* y, int nthreads) {
  if (int64_t bad = check_idx(idx, m, I)) return bad;
  if (B <= 0 || H <= 0) return 0;
  if (m <= 0) {
    std::memset(y, 0, B * H * sizeof(float));
    return 0;
  }
  switch (dtype) {
    case 0:
      ffn_kernel(static_cast<const float*>(wg), static_cast<const float*>(wu), static_cast<const float*>(wd),
                 H, x, B, idx, m, y, nthreads);
      break;
    case 1:
      ffn_kernel(static_cast<const bf16_t*>(wg), static_cast<const bf16_t*>(wu),
                 static_cast<const bf16_t*>(wd), H, x, B, idx, m, y, nthreads);
      break;
    default: return -1;  // int8 FFN: not supported
  }
  return 0;
}

// y [B, N] = x [B, K] @ dequant(packed [N, W], scales fp16 [N, G]).T
int64_t csc_sketch(int bits, const int32_t* packed, int64_t W, const uint16_t* scales, int64_t G,
                   const float* x, int64_t B, int64_t N, int64_t K, int64_t group, float* y, int nthreads) {
  if (B <= 0 || N <= 0) return 0;
  switch (bits) {
    case 1: sketch_kernel<1>(packed, W, scales, G, x, B, N, K, group, y, nthreads); break;
    case 2: sketch_kernel<2>(packed, W, scales, G, x, B, N, K, group, y, nthreads); break;
    case 3: sketch_kernel<3>(packed, W, scales, G, x, B, N, K, group, y, nthreads); break;
    default: sketch_kernel<4>(packed, W, scales, G, x, B, N, K, group, y, nthreads); break;
  }
  return 0;
}

// y [N] = dequant(planes, scales fp16 [N, G]) . x, x [K] float32 quantized to int8 per group
// inside (one row: the batch-1 decode step); bits 2..4, K % 64 == 0, group % 32 == 0.
int64_t csc_sketch_q8(int bits, const uint8_t* planes, int64_t N, int64_t K, const uint16_t* scales,
                      int64_t G, int64_t group, const float* x, float* y, int nthreads) {
  if (bits < 2 || bits > 4 || K % 64 || group % 32 || group <= 0 || G != (K + group - 1) / group)
    return -1;
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> sx, xsum;
  xq.resize(K);
  sx.resize(G);
  xsum.resize(G);
  quantize_x(x, K, group, xq.data(), sx.data(), xsum.data());
  switch (bits) {
    case 2: sketch_q8_kernel<2>(planes, N, K, scales, G, group, xq.data(), sx.data(), xsum.data(), y, nthreads); break;
    case 3: sketch_q8_kernel<3>(planes, N, K, scales, G, group, xq.data(), sx.data(), xsum.data(), y, nthreads); break;
    default: sketch_q8_kernel<4>(planes, N, K, scales, G, group, xq.data(), sx.data(), xsum.data(), y, nthreads); break;
  }
  return 0;
}

// idx [k] = sorted top k of |x[i]| * (scale ? scale[i] : 1), x [n]; *missed = share of the
// score's energy off them (TEAL / WINA input selection at batch 1)
int64_t csc_select(const float* x, int64_t n, const float* scale, int64_t k, int32_t* idx,
                   double* missed) {
  if (k < 0 || k > n) return -1;
  thread_local std::vector<float> score;
  score.resize(n);
  for (int64_t i = 0; i < n; ++i) score[i] = std::fabs(x[i]) * (scale ? scale[i] : 1.0f);
  *missed = topk_sorted(score.data(), n, k, idx);
  return 0;
}

// idx [k] = sorted top k of the logits x [n] (any sign); *missed = the softmax mass off them
// (the lm_head's candidates from its sketch at batch 1)
int64_t csc_select_logits(const float* x, int64_t n, int64_t k, int32_t* idx, double* missed) {
  if (k < 0 || k > n || n <= 0) return -1;
  topk_keys(x, n, k, true, idx);
  float mx = x[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, x[i]);
  double total = 0.0, kept = 0.0;
  for (int64_t i = 0; i < n; ++i) total += std::exp(static_cast<double>(x[i] - mx));
  for (int64_t i = 0; i < k; ++i) kept += std::exp(static_cast<double>(x[idx[i]] - mx));
  *missed = std::max(0.0, 1.0 - kept / total);
  return 0;
}

// y [n] = the sketches' rotation of x [n]
int64_t csc_rotate(const float* x, int64_t n, const int32_t* perm, const float* signs, int64_t b,
                   float* y) {
  if (b < 1 || n % b || (b & (b - 1))) return -1;
  if (int64_t bad = check_idx(perm, n, n)) return bad;
  rotate_kernel(x, n, perm, signs, b, y);
  return 0;
}

// The sketch op's selection at batch 1: est = silu(sketch_g xr) * (sketch_u xr) over N channels
// (xr [K] already rotated; both sketches as planes, csc_sketch_q8), idx [k] = its sorted top k
// by |est|; *missed = the share of |est|^2 off them. est [N] is scratch the caller provides.
int64_t csc_sketch_select(int bits, const uint8_t* planes_g, const uint16_t* scales_g,
                          const uint8_t* planes_u, const uint16_t* scales_u, int64_t G,
                          const float* xr, int64_t N, int64_t K, int64_t group, int64_t k,
                          int32_t* idx, float* est, double* missed, int nthreads) {
  if (k < 0 || k > N) return -1;
  thread_local std::vector<float> up;
  up.resize(N);
  if (csc_sketch_q8(bits, planes_g, N, K, scales_g, G, group, xr, est, nthreads)) return -1;
  csc_sketch_q8(bits, planes_u, N, K, scales_u, G, group, xr, up.data(), nthreads);
  for (int64_t i = 0; i < N; ++i) est[i] = std::fabs(silu(est[i]) * up[i]);
  *missed = topk_sorted(est, N, k, idx);
  return 0;
}

// y [rows, n] = rmsnorm(x [rows, n]) * w [n]
int64_t csc_rmsnorm(const float* x, int64_t rows, int64_t n, const float* w, double eps, float* y) {
  if (rows < 0 || n <= 0) return -1;
  rmsnorm_kernel(x, rows, n, w, static_cast<float>(eps), y);
  return 0;
}

// x [heads, d] in place: rotate-half RoPE with cos, sin [d]; d even
int64_t csc_rope(float* x, int64_t heads, int64_t d, const float* cos, const float* sin) {
  if (heads < 0 || d <= 0 || d % 2) return -1;
  rope_kernel(x, heads, d, cos, sin);
  return 0;
}

// o [Hq, d] = attention of one query row q [Hq, d] over K, V [Hkv, L, d]; Hkv divides Hq
int64_t csc_attention(const float* q, int64_t Hq, int64_t Hkv, int64_t d, const float* K,
                      const float* V, int64_t L, double scale, float* o, int nthreads) {
  if (Hq <= 0 || Hkv <= 0 || Hq % Hkv || d <= 0 || L <= 0) return -1;
  attention_kernel(q, Hq, Hkv, d, K, V, L, static_cast<float>(scale), o, nthreads);
  return 0;
}

// sum of the n bytes at p (a streaming read, for measuring bandwidth)
int64_t csc_read(const uint8_t* p, int64_t n, int nthreads) { return read_bytes_kernel(p, n, nthreads); }

// Byte sum of rows idx [m] (each < nrows; else -2) of row_bytes each (a multiple of 64), read as the sparse kernels
// read kept rows (threads split the rows; the row PF_AHEAD on prefetched into L2 at the same
// pace): what the memory system gives a scattered-row pattern, with no arithmetic.
int64_t csc_read_rows(const uint8_t* p, int64_t nrows, int64_t row_bytes, const int32_t* idx,
                      int64_t m, int nthreads) {
  if (row_bytes <= 0 || row_bytes % 64 || m < 0) return -1;
  if (check_idx(idx, m, nrows)) return -2;
  const int nt = threads_for(nthreads, m * row_bytes, std::max<int64_t>(m, 1));
  int64_t total = 0;
#pragma omp parallel num_threads(nt) reduction(+ : total)
  {
    int64_t i0, i1, s = 0;
    split(m, nt, omp_get_thread_num(), &i0, &i1);
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* r = p + idx[i] * row_bytes;
      const uint8_t* nxt = i + PF_AHEAD < i1 ? p + idx[i + PF_AHEAD] * row_bytes : nullptr;
#if CSC_AVX2
      __m256i a = _mm256_setzero_si256();
      const __m256i z = _mm256_setzero_si256();
      for (int64_t k = 0; k < row_bytes; k += 64) {
        if (nxt) prefetch(nxt + k);
        a = _mm256_add_epi64(a, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + k)), z));
        a = _mm256_add_epi64(a, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + k + 32)), z));
      }
      alignas(32) int64_t l[4];
      _mm256_store_si256(reinterpret_cast<__m256i*>(l), a);
      s += l[0] + l[1] + l[2] + l[3];
#else
      (void)nxt;
      for (int64_t k = 0; k < row_bytes; ++k) s += r[k];
#endif
    }
    total += s;
  }
  return total;
}

}  // extern "C"

// ----------------------------------------------------------------------------- Python module
// The same C ABI as a CPython extension module (METH_FASTCALL: ~0.3 us a call where ctypes
// takes ~2 us): every argument is a Python int (data pointers from Tensor.data_ptr()) or None
// (a null pointer); the GIL is released while a kernel runs. No torch headers are needed.
#ifdef CSC_PYTHON_MODULE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace {
bool py_args(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t want, int64_t* out) {
  if (nargs != want) {
    PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", want, nargs);
    return false;
  }
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    if (args[i] == Py_None) {
      out[i] = 0;
      continue;
    }
    out[i] = PyLong_AsLongLong(args[i]);
    if (out[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

template <typename P>
inline P ptr(int64_t v) {
  return reinterpret_cast<P>(static_cast<intptr_t>(v));
}

PyObject* py_rows(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[11];
  if (!py_args(args, nargs, 11, a)) return nullptr;
  int64_t rc;
  Py_BEGIN_ALLOW_THREADS
  rc = csc_rows(static_cast<int>(a[0]), ptr<const void*>(a[1]), a[2], a[3], ptr<const float*>(a[4]), a[5],
                ptr<const int32_t*>(a[6]), a[7], ptr<const float*>(a[8]), ptr<float*>(a[9]), static_cast<int>(a[10]));
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(rc);
}

PyObject* py_gather(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[11];
  if (!py_args(args, nargs, 11, a)) return nullptr;
  int64_t rc;
  Py_BEGIN_ALLOW_THREADS
  rc = csc_gather(static_cast<int>(a[0]), ptr<const void*>(a[1]), a[2], a[3], ptr<const float*>(a[4]), a[5],
                  ptr<const int32_t*>(a[6]), a[7], ptr<const float*>(a[8]), ptr<float*>(a[9]), static_cast<int>(a[10]));
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(rc);
}

PyObject* py_gather_q4(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[11];
  if (!py_args(args, nargs, 11, a)) return nullptr;
  int64_t rc;
  Py_BEGIN_ALLOW_THREADS
  rc = csc_gather_q4(ptr<const uint8_t*>(a[0]), ptr<const uint16_t*>(a[1]), a[2], a[3], ptr<const float*>(a[4]),
                     a[5], ptr<const int32_t*>(a[6]), a[7], ptr<const int32_t*>(a[8]), ptr<float*>(a[9]),
                     static_cast<int>(a[10]));
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(rc);
}

PyObject* py_ffn(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[12];
  if (!py_args(args, nargs, 12, a)) return nullptr;
  int64_t rc;
  Py_BEGIN_ALLOW_THREADS
  rc = csc_ffn(static_cast<int>(a[0]), ptr<const void*>(a[1]), ptr<const void*>(a[2]), ptr<const void*>(a[3]), a[4],
               a[5], ptr<const float*>(a[6]), a[7], ptr<const int32_t*>(a[8]), a[9], ptr<float*>(a[10]),
               static_cast<int>(a[11]));
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(rc);
}

PyObject* py_sketch(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[12];
  if (!py_args(args, nargs, 12, a)) return nullptr;
  int64_t rc;
  Py_BEGIN_ALLOW_THREADS
  rc = csc_sketch(static_cast<int>(a[0]), ptr<const int32_t*>(a[1]), a[2], ptr<const uint16_t*>(a[3]), a[4],
                  ptr<const float*>(a[5]), a[6], a[7], a[8], a[9], ptr<float*>(a[10]), static_cast<int>(a[11]));
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(rc);
}

PyObject* py_read(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[3];
  if (!py_args(args, nargs, 3, a)) return nullptr;
  int64_t rc;
  Py_BEGIN_ALLOW_THREADS
  rc = csc_read(ptr<const uint8_t*>(a[0]), a[1], static_cast<int>(a[2]));
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(rc);
}

// selection calls return the missed share as a float, or None for a bad argument
PyObject* py_select(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[5];
  if (!py_args(args, nargs, 5, a)) return nullptr;
  int64_t rc;
  double missed = 0.0;
  rc = csc_select(ptr<const float*>(a[0]), a[1], ptr<const float*>(a[2]), a[3], ptr<int32_t*>(a[4]), &missed);
  if (rc) Py_RETURN_NONE;
  return PyFloat_FromDouble(missed);
}

PyObject* py_sketch_q8(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[10];
  if (!py_args(args, nargs, 10, a)) return nullptr;
  int64_t rc;
  Py_BEGIN_ALLOW_THREADS
  rc = csc_sketch_q8(static_cast<int>(a[0]), ptr<const uint8_t*>(a[1]), a[2], a[3], ptr<const uint16_t*>(a[4]),
                     a[5], a[6], ptr<const float*>(a[7]), ptr<float*>(a[8]), static_cast<int>(a[9]));
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(rc);
}

PyObject* py_rotate(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[6];
  if (!py_args(args, nargs, 6, a)) return nullptr;
  return PyLong_FromLongLong(csc_rotate(ptr<const float*>(a[0]), a[1], ptr<const int32_t*>(a[2]),
                                        ptr<const float*>(a[3]), a[4], ptr<float*>(a[5])));
}

PyObject* py_read_rows(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[6];
  if (!py_args(args, nargs, 6, a)) return nullptr;
  int64_t rc;
  Py_BEGIN_ALLOW_THREADS
  rc = csc_read_rows(ptr<const uint8_t*>(a[0]), a[1], a[2], ptr<const int32_t*>(a[3]), a[4], static_cast<int>(a[5]));
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(rc);
}

PyObject* py_select_logits(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[4];
  if (!py_args(args, nargs, 4, a)) return nullptr;
  double missed = 0.0;
  if (csc_select_logits(ptr<const float*>(a[0]), a[1], a[2], ptr<int32_t*>(a[3]), &missed))
    Py_RETURN_NONE;
  return PyFloat_FromDouble(missed);
}

PyObject* py_sketch_select(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[14];
  if (!py_args(args, nargs, 14, a)) return nullptr;
  int64_t rc;
  double missed = 0.0;
  Py_BEGIN_ALLOW_THREADS
  rc = csc_sketch_select(static_cast<int>(a[0]), ptr<const uint8_t*>(a[1]), ptr<const uint16_t*>(a[2]),
                         ptr<const uint8_t*>(a[3]), ptr<const uint16_t*>(a[4]), a[5],
                         ptr<const float*>(a[6]), a[7], a[8], a[9], a[10], ptr<int32_t*>(a[11]),
                         ptr<float*>(a[12]), &missed, static_cast<int>(a[13]));
  Py_END_ALLOW_THREADS
  if (rc) Py_RETURN_NONE;
  return PyFloat_FromDouble(missed);
}

PyObject* py_rmsnorm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 6) return PyErr_Format(PyExc_TypeError, "expected 6 arguments, got %zd", nargs);
  const double eps = PyFloat_AsDouble(args[4]);  // the one float argument
  if (eps == -1.0 && PyErr_Occurred()) return nullptr;
  PyObject* ints[5] = {args[0], args[1], args[2], args[3], args[5]};
  int64_t a[5];
  if (!py_args(ints, 5, 5, a)) return nullptr;
  return PyLong_FromLongLong(csc_rmsnorm(ptr<const float*>(a[0]), a[1], a[2], ptr<const float*>(a[3]), eps,
                                         ptr<float*>(a[4])));
}

PyObject* py_rope(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[5];
  if (!py_args(args, nargs, 5, a)) return nullptr;
  return PyLong_FromLongLong(csc_rope(ptr<float*>(a[0]), a[1], a[2], ptr<const float*>(a[3]),
                                      ptr<const float*>(a[4])));
}

PyObject* py_attention(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 10) return PyErr_Format(PyExc_TypeError, "expected 10 arguments, got %zd", nargs);
  const double scale = PyFloat_AsDouble(args[7]);
  if (scale == -1.0 && PyErr_Occurred()) return nullptr;
  PyObject* ints[9] = {args[0], args[1], args[2], args[3], args[4], args[5], args[6], args[8], args[9]};
  int64_t a[9];
  if (!py_args(ints, 9, 9, a)) return nullptr;
  int64_t rc;
  Py_BEGIN_ALLOW_THREADS
  rc = csc_attention(ptr<const float*>(a[0]), a[1], a[2], a[3], ptr<const float*>(a[4]),
                     ptr<const float*>(a[5]), a[6], scale, ptr<float*>(a[7]), static_cast<int>(a[8]));
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(rc);
}

PyObject* py_abi(PyObject*, PyObject* const*, Py_ssize_t) { return PyLong_FromLong(csc_abi_version()); }
PyObject* py_avx2(PyObject*, PyObject* const*, Py_ssize_t) { return PyLong_FromLong(csc_has_avx2()); }

#define CSC_FAST(fn) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(fn)), METH_FASTCALL
PyMethodDef csc_methods[] = {
    {"csc_rows", CSC_FAST(py_rows), "csc_rows(dtype, w, N, K, x, B, idx, M, scale, y, threads) -> status"},
    {"csc_gather", CSC_FAST(py_gather), "csc_gather(dtype, wt, K, N, x, B, idx, m, scale, y, threads) -> status"},
    {"csc_gather_q4", CSC_FAST(py_gather_q4),
     "csc_gather_q4(codes, scales, K, N, x, B, idx, m, rowmap, y, threads) -> status"},
    {"csc_ffn", CSC_FAST(py_ffn), "csc_ffn(dtype, wg, wu, wd, I, H, x, B, idx, m, y, threads) -> status"},
    {"csc_sketch", CSC_FAST(py_sketch), "csc_sketch(bits, packed, W, scales, G, x, B, N, K, group, y, threads)"},
    {"csc_read", CSC_FAST(py_read), "csc_read(ptr, nbytes, threads) -> byte sum"},
    {"csc_read_rows", CSC_FAST(py_read_rows), "csc_read_rows(ptr, nrows, row_bytes, idx, m, threads) -> byte sum | -1 | -2"},
    {"csc_select", CSC_FAST(py_select), "csc_select(x, n, scale, k, idx) -> missed | None"},
    {"csc_select_logits", CSC_FAST(py_select_logits), "csc_select_logits(x, n, k, idx) -> missed | None"},
    {"csc_rotate", CSC_FAST(py_rotate), "csc_rotate(x, n, perm, signs, block, y) -> status"},
    {"csc_sketch_select", CSC_FAST(py_sketch_select),
     "csc_sketch_select(bits, planes_g, sg, planes_u, su, G, xr, N, K, group, k, idx, est, threads) -> missed | None"},
    {"csc_sketch_q8", CSC_FAST(py_sketch_q8), "csc_sketch_q8(bits, planes, N, K, scales, G, group, x, y, threads) -> status"},
    {"csc_rmsnorm", CSC_FAST(py_rmsnorm), "csc_rmsnorm(x, rows, n, w, eps, y) -> status"},
    {"csc_rope", CSC_FAST(py_rope), "csc_rope(x, heads, d, cos, sin) -> status (in place)"},
    {"csc_attention", CSC_FAST(py_attention),
     "csc_attention(q, Hq, Hkv, d, K, V, L, scale, o, threads) -> status"},
    {"csc_abi_version", CSC_FAST(py_abi), ""},
    {"csc_has_avx2", CSC_FAST(py_avx2), ""},
    {nullptr, nullptr, 0, nullptr}};

#define CSC_STR2(x) #x
#define CSC_STR(x) CSC_STR2(x)
PyModuleDef csc_module = {PyModuleDef_HEAD_INIT, CSC_STR(TORCH_EXTENSION_NAME), "cscompile CPU sparse GEMV kernels",
                          -1, csc_methods, nullptr, nullptr, nullptr, nullptr};
}  // namespace

#define CSC_CAT2(a, b) a##b
#define CSC_CAT(a, b) CSC_CAT2(a, b)
PyMODINIT_FUNC CSC_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&csc_module); }
#endif  // CSC_PYTHON_MODULE
