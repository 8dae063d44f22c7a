// One decoding step of llmcli's GPT for a single sequence, in one call: embedding, every block
// (norm, qkv, RoPE, attention over the KV cache, projection, norm, feed-forward), the final norm
// and the output layer. Batch-1 decoding reads every weight once per token, so its speed is the
// speed of the matrix-vector products plus whatever runs between them; here the products read
// each weight row as one sequential stream (what the memory system serves fastest) and nothing
// else costs a dispatch. Weights and the KV cache are the model's own tensors (fp32 or bf16);
// activations stay in fp32 (a bf16 model's matrix products round their input to bf16, as its
// PyTorch layers do). Built and loaded by native_decode.py, which falls back to PyTorch when
// this cannot be compiled.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <atomic>
#include <vector>

#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

extern "C" {

struct Spec {
  int64_t d_model, heads, ffn, vocab, layers, max_len;
  int32_t bf16, rmsnorm, activation, positions;  // activation 0 relu 1 gelu 2 swiglu;
  int32_t threads, unused;                        // positions 0 sinusoidal 1 learned 2 rope
  float eps, unused2;
  const void* tok_emb;
  const void* pos;  // sinusoidal table or learned embedding (max_len, d), or the RoPE cos table
  const void* rope_sin;
  const void* norm_w;
  const void* norm_b;
  const void* head_w;
  const void* head_b;
  const void* const* layer;  // 14 per block: norm1 w,b  qkv w,b  proj w,b  norm2 w,b
                             //               fc_in w,b  fc_gate w,b  fc_out w,b  (absent: null)
  void* k;                   // (layers, heads, max_len, head_dim), the model's dtype
  void* v;
  float* scratch;            // 5 d + ffn + heads * max_len floats
};

struct Pick {  // a greedy choice: the first index of the largest logit and its log-probability
  int64_t index;
  float logprob;
  int32_t ok;  // 0 where torch must answer: a NaN or +inf logit, or every logit -inf
};

}  // extern "C"

namespace {

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float at(const void* p, int64_t i, bool bf16) {
  return bf16 ? bf16_to_float(static_cast<const uint16_t*>(p)[i])
              : static_cast<const float*>(p)[i];
}

inline void put(void* p, int64_t i, float value, bool bf16) {
  if (bf16)
    static_cast<uint16_t*>(p)[i] = float_to_bf16(value);
  else
    static_cast<float*>(p)[i] = value;
}

// Four independent sums hide the FMA latency. No software prefetch: each thread reads one long
// run of rows, which the hardware prefetchers follow better on their own (measured: about 10 %
// more bandwidth than prefetching 2-16 KiB ahead).
float dot_f32(const float* w, const float* x, int64_t n) {
  int64_t k = 0;
  float sum = 0.0f;
#ifdef __AVX512F__
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; k + 64 <= n; k += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
  }
  sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
#pragma omp simd reduction(+ : sum)
  for (int64_t j = k; j < n; ++j) sum += w[j] * x[j];
  return sum;
}

#if defined(__AVX512BF16__)
inline __m512bh pairs(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
#endif

// Both sides in bf16 (a bf16 model's layers round their input to bf16), sums in fp32; with
// AVX-512 BF16 each instruction multiplies 32 weight-input pairs.
float dot_bf16(const uint16_t* w, const uint16_t* x, int64_t n) {
  int64_t k = 0;
  float sum = 0.0f;
#if defined(__AVX512BF16__)
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; k + 128 <= n; k += 128) {
    a0 = _mm512_dpbf16_ps(a0, pairs(w + k), pairs(x + k));
    a1 = _mm512_dpbf16_ps(a1, pairs(w + k + 32), pairs(x + k + 32));
    a2 = _mm512_dpbf16_ps(a2, pairs(w + k + 64), pairs(x + k + 64));
    a3 = _mm512_dpbf16_ps(a3, pairs(w + k + 96), pairs(x + k + 96));
  }
  for (; k + 32 <= n; k += 32) a0 = _mm512_dpbf16_ps(a0, pairs(w + k), pairs(x + k));
  sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
#pragma omp simd reduction(+ : sum)
  for (int64_t j = k; j < n; ++j) sum += bf16_to_float(w[j]) * bf16_to_float(x[j]);
  return sum;
}

// A product's input as every thread reads it: fp32, and rounded to bf16 for bf16 weights.
struct Input {
  const float* f32;
  const uint16_t* bf16;
};

Input prepare(const float* values, int64_t n, bool bf16, std::vector<uint16_t>& rounded) {
  if (bf16) {
    rounded.resize(n);
    for (int64_t k = 0; k < n; ++k) rounded[k] = float_to_bf16(values[k]);
  }
  return {values, rounded.data()};
}

// Row r of W x (+ b); W is (out, in) row-major.
inline float row(const void* w, const void* b, int64_t r, const Input& x, int64_t in,
                 bool bf16) {
  const float s = bf16 ? dot_bf16(static_cast<const uint16_t*>(w) + r * in, x.bf16, in)
                       : dot_f32(static_cast<const float*>(w) + r * in, x.f32, in);
  return b ? s + at(b, r, bf16) : s;
}

// This thread's even share [begin, end) of n rows or heads.
struct Share {
  int64_t begin, end;
  Share(int64_t n, int thread, int team)
      : begin(n * thread / team), end(n * (thread + 1) / team) {}
};

// The rows of every matrix product of a step, shared out as the threads go: each thread takes
// its own even part from the front, in runs that shrink as the part drains, and when it is done
// takes runs from the back of the others' parts. Each thread still reads long contiguous runs
// (what the memory system serves fastest; handing out small chunks in turn was much slower),
// and no thread waits at a barrier for more than the last run of another. The two cores of a
// virtual machine read memory at rates that differ, by up to 30 % for minutes at a time and
// from one product to the next; with fixed parts the faster one waited at every barrier (20 %
// of an fp32 step). Each row is still computed whole by one thread: the logits do not depend
// on who took it.
class Work {
 public:
  Work(const Spec& s, int threads) : spec_(s), threads_(threads), parts_(products(s) * threads) {
    for (int64_t p = 0; p < products(s); ++p)
      for (int t = 0; t < threads; ++t) {
        const Share even(rows_of(s, p), t, threads);
        parts_[p * threads + t].rows.store(even.begin | even.end << 32, std::memory_order_relaxed);
      }
  }

  // Runs body(begin, end) on every run of product p's rows this thread takes.
  template <typename Body>
  void run(int64_t p, int thread, int team, Body body) {
    if (team != threads_) {  // the runtime gave fewer threads than asked: fixed parts
      const Share mine(rows_of(spec_, p), thread, team);
      return body(mine.begin, mine.end);
    }
    take(p, thread, true, body);
    for (int k = 1; k < team; ++k) take(p, (thread + k) % team, false, body);
  }

  static int64_t products(const Spec& s) { return 4 * s.layers + 1; }

  // Product p: per block qkv, projection, feed-forward in, feed-forward out; then the output.
  static int64_t rows_of(const Spec& s, int64_t p) {
    if (p == 4 * s.layers) return s.vocab;
    return p % 4 == 0 ? 3 * s.d_model : p % 4 == 2 ? s.ffn : s.d_model;
  }

 private:
  struct alignas(64) Part {  // [begin, end) of the rows still to take: begin | end << 32
    std::atomic<int64_t> rows;
  };

  template <typename Body>
  void take(int64_t p, int owner, bool front, Body& body) {
    std::atomic<int64_t>& rows = parts_[p * threads_ + owner].rows;
    int64_t now = rows.load(std::memory_order_acquire);
    for (;;) {
      const int64_t begin = now & 0xffffffff, end = now >> 32, left = end - begin;
      if (left <= 0) return;
      int64_t run = left / (front ? 8 : 4);  // the owner keeps the larger share of what is left
      run = run < 16 ? (left < 16 ? left : 16) : run;
      const int64_t next = front ? (begin + run) | end << 32 : begin | (end - run) << 32;
      if (rows.compare_exchange_weak(now, next, std::memory_order_acq_rel)) {
        if (front)
          body(begin, begin + run);
        else
          body(end - run, end);
        now = rows.load(std::memory_order_acquire);
      }
    }
  }

  const Spec& spec_;
  int threads_;
  std::vector<Part> parts_;
};

// Rows [begin, end) of W x (+ b) into y.
void rows(const void* w, const void* b, const Input& x, float* y, int64_t in, bool bf16,
          int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) y[r] = row(w, b, r, x, in, bf16);
}

void norm(const Spec& s, const void* w, const void* b, const float* x, float* y) {
  const int64_t d = s.d_model;
  const bool bf16 = s.bf16;
  double mean = 0.0, square = 0.0;
  for (int64_t i = 0; i < d; ++i) {
    mean += x[i];
    square += static_cast<double>(x[i]) * x[i];
  }
  mean /= d;
  square /= d;
  float shift = s.rmsnorm ? 0.0f : static_cast<float>(mean);
  double var = s.rmsnorm ? square : square - mean * mean;
  float inv = static_cast<float>(1.0 / sqrt((var > 0 ? var : 0.0) + s.eps));
  for (int64_t i = 0; i < d; ++i) {
    float v = (x[i] - shift) * inv * at(w, i, bf16);
    y[i] = b ? v + at(b, i, bf16) : v;
  }
}

void rope(const Spec& s, float* x, int64_t pos) {  // one head's pairs (x[2i], x[2i+1])
  const int64_t half = s.d_model / s.heads / 2;
  for (int64_t i = 0; i < half; ++i) {
    float c = at(s.pos, pos * half + i, s.bf16), n = at(s.rope_sin, pos * half + i, s.bf16);
    float a = x[2 * i], b = x[2 * i + 1];
    x[2 * i] = a * c - b * n;
    x[2 * i + 1] = a * n + b * c;
  }
}

// exp(x) for x <= 0 (x = logit - max): 2^n e^r with |r| <= ln 2 / 2 and a degree-6 Taylor
// series (error about 1e-7, an ulp); x is clamped at -127, where the result underflows to 0.
#ifdef __AVX512F__
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-127.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln 2, split in two
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
#endif

inline float load(float v) { return v; }
inline float load(uint16_t v) { return bf16_to_float(v); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VECTOR_ATTENTION 1
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#endif

// Softmax of q against the cached keys 0..pos, then the weighted sum of the values into out.
// Scalar: any head width, any CPU.
template <typename T>
void attend_scalar(const float* q, const T* keys, const T* values, int64_t hd, int64_t pos,
                   float* sc, float* out) {
  const float scale = 1.0f / sqrtf(static_cast<float>(hd));
  float best = -INFINITY;
  for (int64_t j = 0; j <= pos; ++j) {
    const T* key = keys + j * hd;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < hd; ++i) dot += q[i] * load(key[i]);
    sc[j] = dot * scale;
    best = sc[j] > best ? sc[j] : best;
  }
  float total = 0.0f;
  for (int64_t j = 0; j <= pos; ++j) {
    sc[j] = expf(sc[j] - best);
    total += sc[j];
  }
  for (int64_t i = 0; i < hd; ++i) out[i] = 0.0f;
  for (int64_t j = 0; j <= pos; ++j) {
    const T* value = values + j * hd;
    const float p = sc[j] / total;
#pragma omp simd
    for (int64_t i = 0; i < hd; ++i) out[i] += p * load(value[i]);
  }
}

#ifdef VECTOR_ATTENTION
// The same with AVX-512, 16 lanes of a head at a time (the last masked): on cached data 2.6x the
// scalar loops' speed in bf16, 1.6x in fp32. In a step (scifi dimensions, bf16, positions
// 60-100) the phase went from 165 to 97-112 us of 3.2 ms: the rest is mostly waiting for the
// cache's keys and values, which every step's stream of weights has pushed out to memory.
constexpr int64_t kMaxVectorHead = 256;

template <typename T>
void attend_vector(const float* q, const T* keys, const T* values, int64_t hd, int64_t pos,
                   float* sc, float* out) {
  const int64_t chunks = (hd + 15) / 16;
  __mmask16 mask[kMaxVectorHead / 16];
  __m512 qv[kMaxVectorHead / 16];
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t left = hd - 16 * c;
    mask[c] = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
    qv[c] = load16(q + 16 * c, mask[c]);
  }
  const float scale = 1.0f / sqrtf(static_cast<float>(hd));
  const int64_t row_bytes = hd * static_cast<int64_t>(sizeof(T));
  for (int64_t j = 0; j <= pos; ++j) {
    const T* key = keys + j * hd;
    // Value rows asked for beside the key rows: two runs from memory at once, not one after
    // the other (20-30 us of the phase).
    const char* value = reinterpret_cast<const char*>(values + j * hd);
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(value + b);
    __m512 acc = _mm512_mul_ps(qv[0], load16(key, mask[0]));
    for (int64_t c = 1; c < chunks; ++c)
      acc = _mm512_fmadd_ps(qv[c], load16(key + 16 * c, mask[c]), acc);
    sc[j] = _mm512_reduce_add_ps(acc) * scale;
  }
  const int64_t n = pos + 1;
  __m512 top = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(sc + j));
  float best = _mm512_reduce_max_ps(top);
  for (int64_t k = j; k < n; ++k) best = sc[k] > best ? sc[k] : best;
  const __m512 shift = _mm512_set1_ps(best);
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + j), shift));
    _mm512_mask_storeu_ps(sc + j, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(sum);
  for (int64_t b = 0; b < chunks; b += 4) {  // four 16-lane sums held in registers per pass
    const __mmask16 m0 = mask[b], m1 = b + 1 < chunks ? mask[b + 1] : 0,
                    m2 = b + 2 < chunks ? mask[b + 2] : 0, m3 = b + 3 < chunks ? mask[b + 3] : 0;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < n; ++k) {
      const T* value = values + k * hd + 16 * b;
      const __m512 p = _mm512_set1_ps(sc[k] * inv);
      a0 = _mm512_fmadd_ps(p, load16(value, m0), a0);
      if (m1) a1 = _mm512_fmadd_ps(p, load16(value + 16, m1), a1);
      if (m2) a2 = _mm512_fmadd_ps(p, load16(value + 32, m2), a2);
      if (m3) a3 = _mm512_fmadd_ps(p, load16(value + 48, m3), a3);
    }
    _mm512_mask_storeu_ps(out + 16 * b, m0, a0);
    _mm512_mask_storeu_ps(out + 16 * b + 16, m1, a1);
    _mm512_mask_storeu_ps(out + 16 * b + 32, m2, a2);
    _mm512_mask_storeu_ps(out + 16 * b + 48, m3, a3);
  }
}
#endif

// Head h at position pos: RoPE on its query and key, its key and value into the cache, and its
// query against the cached keys 0..pos; out is head-major, as the model reshapes it.
template <typename T>
void attend(const Spec& s, int64_t layer, int64_t h, float* qkv, int64_t pos, float* scores,
            float* out) {
  const int64_t d = s.d_model, hd = d / s.heads;
  float* q = qkv + h * hd;
  if (s.positions == 2) {
    rope(s, q, pos);
    rope(s, qkv + d + h * hd, pos);
  }
  const int64_t base = ((layer * s.heads + h) * s.max_len) * hd;
  T* keys = static_cast<T*>(s.k) + base;
  T* values = static_cast<T*>(s.v) + base;
  for (int64_t i = 0; i < hd; ++i) {
    put(keys, pos * hd + i, qkv[d + h * hd + i], s.bf16);
    put(values, pos * hd + i, qkv[2 * d + h * hd + i], s.bf16);
  }
  float* sc = scores + h * s.max_len;
#ifdef VECTOR_ATTENTION
  if (hd <= kMaxVectorHead) return attend_vector(q, keys, values, hd, pos, sc, out + h * hd);
#endif
  attend_scalar(q, keys, values, hd, pos, sc, out + h * hd);
}

float activate(int activation, float x) {
  if (activation == 0) return x > 0.0f ? x : 0.0f;
  if (activation == 1) {  // GELU, tanh approximation
    const float c = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
  }
  return x / (1.0f + expf(-x));  // SiLU, SwiGLU's gate
}

// A thread's part of a row of logits, added up chunk by chunk (in whatever order its runs
// come): its largest value, the smallest index holding it, and the sum of exp(logit - max).
struct LogitPart {
  float max = -INFINITY, sum = 0.0f;
  int64_t index = -1;
  bool finite = true;
};

void share_max(const float* x, int64_t begin, int64_t end, LogitPart& s) {
  float best = -INFINITY;
  int64_t k = begin;
#ifdef __AVX512F__
  __m512 m = _mm512_set1_ps(-INFINITY);
  __mmask16 odd = 0;  // lanes that saw a NaN or an infinity
  for (; k + 16 <= end; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    odd |= _mm512_fpclass_ps_mask(v, 0x01 | 0x80 | 0x08);  // QNaN, SNaN, +inf
    m = _mm512_max_ps(m, v);
  }
  best = _mm512_reduce_max_ps(m);
  if (odd) s.finite = false;
#endif
  for (; k < end; ++k) {
    if (!(x[k] < INFINITY)) s.finite = false;  // NaN or +inf
    best = x[k] > best ? x[k] : best;
  }
  s.max = best;
}

void share_sum(const float* x, int64_t begin, int64_t end, float max, LogitPart& s) {
  int64_t k = begin;
  float sum = 0.0f;
#ifdef __AVX512F__
  const __m512 shift = _mm512_set1_ps(max);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  for (; k + 32 <= end; k += 32) {
    a0 = _mm512_add_ps(a0, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + k), shift)));
    a1 = _mm512_add_ps(a1, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + k + 16), shift)));
  }
  sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
  for (; k < end; ++k) sum += expf(x[k] - max);
  s.sum = sum;
  k = begin;
#ifdef __AVX512F__
  const __m512 top = _mm512_set1_ps(max);
  for (; k + 16 <= end; k += 16) {
    const __mmask16 hit = _mm512_cmpeq_ps_mask(_mm512_loadu_ps(x + k), top);
    if (hit) {
      s.index = k + __builtin_ctz(hit);
      return;
    }
  }
#endif
  for (; k < end; ++k)
    if (x[k] == max) {
      s.index = k;
      return;
    }
}


// Logits [begin, end) into a running part: a larger max rescales the sum so far (an online
// softmax), so each chunk is read while it is still in L1, right after it was computed.
void add_chunk(const float* x, int64_t begin, int64_t end, LogitPart& run) {
  LogitPart chunk;
  share_max(x, begin, end, chunk);
  run.finite = run.finite && chunk.finite;
  if (!run.finite || chunk.max == -INFINITY) return;
  if (chunk.max > run.max) {
    run.sum = run.max == -INFINITY ? 0.0f : run.sum * expf(run.max - chunk.max);
    run.max = chunk.max;
    run.index = -1;
  }
  share_sum(x, begin, end, run.max, chunk);
  run.sum += chunk.sum;
  if (chunk.index >= 0 && (run.index < 0 || chunk.index < run.index)) run.index = chunk.index;
}

constexpr int64_t kPickChunk = 512;  // logits, 2 KiB

void add_range(const float* x, int64_t begin, int64_t end, LogitPart& run) {
  for (int64_t at = begin; at < end; at += kPickChunk)
    add_chunk(x, at, at + kPickChunk < end ? at + kPickChunk : end, run);
}

// The threads' parts as one choice: the smallest index holding the largest value, as torch's
// argmax gives it.
Pick combine(const LogitPart* parts, int count) {
  Pick pick{-1, 0.0f, 0};
  float max = -INFINITY;
  for (int i = 0; i < count; ++i) {
    if (!parts[i].finite) return pick;
    max = parts[i].max > max ? parts[i].max : max;
  }
  if (max == -INFINITY) return pick;
  float sum = 0.0f;
  for (int i = 0; i < count; ++i) {
    if (parts[i].max == -INFINITY) continue;
    sum += parts[i].sum * expf(parts[i].max - max);
    if (parts[i].max == max && (pick.index < 0 || parts[i].index < pick.index))
      pick.index = parts[i].index;
  }
  const float lse = max + logf(sum);  // rounded as torch's logsumexp is
  pick.logprob = max - lse;
  pick.ok = 1;
  return pick;
}

}  // namespace

extern "C" {

// Greedy choice from n logits, as torch's argmax and logsumexp give it: the first index of the
// largest value and its log-probability. Returns 0, or 1 where torch must answer (Pick.ok).
// 17 us against 165 us for torch's argmax and logsumexp over 100,256 logits (timed alone).
int llm_greedy_pick(const float* logits, int64_t n, int threads, int64_t* index,
                    float* logprob) {
  std::vector<LogitPart> parts(threads);
  int count = 1;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    if (t == 0) count = omp_get_num_threads();
    const Share mine(n, t, omp_get_num_threads());
    add_range(logits, mine.begin, mine.end, parts[t]);
  }
  const Pick pick = combine(parts.data(), count);
  *index = pick.index;
  *logprob = pick.logprob;
  return pick.ok ? 0 : 1;
}

// Logits (vocab floats) for `token` at position `pos`; writes its keys and values to the cache.
// Returns 0, or 1 for a token outside the vocabulary, 2 for a position outside the context.
// One parallel region for the whole step: each thread keeps its own copy of the residual stream
// and of the normed input (a few KiB, computed alike by all), takes rows of every product as
// they are shared out (`Work`) and an even share of the heads, and waits only where the next
// phase reads what another thread wrote: five barriers a block. With `pick`, also the greedy
// choice from the logits, each chunk added up while still in L1 (a separate pass read them
// back from memory: 40-50 us a token).
int llm_decode_step(const Spec* spec, int64_t token, int64_t pos, float* logits, Pick* pick) {
  const Spec& s = *spec;
  const int64_t d = s.d_model, ffn = s.ffn;
  const bool bf16 = s.bf16;
  if (token < 0 || token >= s.vocab) return 1;
  if (pos < 0 || pos >= s.max_len) return 2;
  float* qkv = s.scratch;  // shared between the threads
  float* att = qkv + 3 * d;
  float* out = att + d;
  float* ff = out + d;
  float* scores = ff + ffn;
  std::vector<LogitPart> parts(s.threads);
  Work work(s, s.threads);
  int count = 1;
#pragma omp parallel num_threads(s.threads)
  {
    const int thread = omp_get_thread_num(), team = omp_get_num_threads();
    if (thread == 0) count = team;
    std::vector<float> x(d), normed(d);
    std::vector<uint16_t> rounded;
    // Product `index` (W x + b, `in` columns) into y, this thread's runs of it.
    auto product = [&](int64_t index, const void* w, const void* b, const Input& x, float* y,
                       int64_t in) {
      work.run(index, thread, team, [&](int64_t begin, int64_t end) {
        rows(w, b, x, y, in, bf16, begin, end);
      });
    };
    for (int64_t i = 0; i < d; ++i) {
      x[i] = at(s.tok_emb, token * d + i, bf16);
      if (s.positions != 2) x[i] += at(s.pos, pos * d + i, bf16);
    }
    for (int64_t l = 0; l < s.layers; ++l) {
      const void* const* p = s.layer + 14 * l;
      norm(s, p[0], p[1], x.data(), normed.data());
      product(4 * l, p[2], p[3], prepare(normed.data(), d, bf16, rounded), qkv, d);
#pragma omp barrier
      const Share heads(s.heads, thread, team);
      for (int64_t h = heads.begin; h < heads.end; ++h) {
        if (bf16)
          attend<uint16_t>(s, l, h, qkv, pos, scores, att);
        else
          attend<float>(s, l, h, qkv, pos, scores, att);
      }
#pragma omp barrier
      product(4 * l + 1, p[4], p[5], prepare(att, d, bf16, rounded), out, d);
#pragma omp barrier
      for (int64_t i = 0; i < d; ++i) x[i] += out[i];
      norm(s, p[6], p[7], x.data(), normed.data());
      const Input in = prepare(normed.data(), d, bf16, rounded);
      work.run(4 * l + 2, thread, team, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const float v = row(p[8], p[9], r, in, d, bf16);
          ff[r] = s.activation == 2 ? v * activate(2, row(p[10], p[11], r, in, d, bf16))
                                    : activate(s.activation, v);
        }
      });
#pragma omp barrier
      product(4 * l + 3, p[12], p[13], prepare(ff, ffn, bf16, rounded), out, ffn);
#pragma omp barrier
      for (int64_t i = 0; i < d; ++i) x[i] += out[i];
    }
    norm(s, s.norm_w, s.norm_b, x.data(), normed.data());
    const Input in = prepare(normed.data(), d, bf16, rounded);
    work.run(4 * s.layers, thread, team, [&](int64_t begin, int64_t end) {
      for (int64_t at = begin; at < end; at += kPickChunk) {
        const int64_t stop = at + kPickChunk < end ? at + kPickChunk : end;
        for (int64_t r = at; r < stop; ++r) logits[r] = row(s.head_w, s.head_b, r, in, d, bf16);
        if (pick) add_chunk(logits, at, stop, parts[thread]);
      }
    });
  }
  if (pick) *pick = combine(parts.data(), count);
  return 0;
}

}  // extern "C"
