// Fused routed-expert kernels for one token (decode), for mx.fast.metal_kernel.
//
// The Metal mirror of expert_glu.cu: the same sections, helpers and loops, line for line; a CUDA
// warp is a Metal simdgroup (32 lanes), __shfl_xor_sync sums are simd_sum, and the vector loads
// become scalar loads of consecutive words (the Metal compiler merges them).
//   header   helpers, placed before the generated kernel functions
//   gate_up  kernel body: act[e, i] = silu(gate_e[i] . x) * (up_e[i] . x)          -> act [N, I] fp32
//   down     kernel body: out[h] = sum_e score_e * (down_e[h] . act[e])  (WEIGHTED) -> out [H]
//                         out[e, h] = down_e[h] . act[e]                  (otherwise) -> out [N, H]
// for the N chosen experts e, each read from the bank slot slots[e] of the weight arrays [slots, ...].
//
// UNVERIFIED ON HARDWARE until benchmarks/metal_check.py has been run on a Mac and recorded in
// docs/PERFORMANCE.md; the engine uses the pure-MLX twin on Metal unless LLM_FLASH_MOE_METAL_KERNEL=1.

// ===== header =====
// (mlx's default header already brings metal_stdlib, uint32_t, bfloat16_t, half.)

namespace flash_moe {

// One pack's BITS words (the CUDA file's vector loads, as scalar loads).
template <int BITS>
inline void load_pack(const device uint32_t* p, thread uint32_t* w) {
  for (int k = 0; k < BITS; ++k) w[k] = p[k];
}

// Where value j of a pack sits: a field inside one 16-bit half of a word is read in place, masked
// but not shifted, so it comes out multiplied by 2^field_shift; the activation it meets is divided
// by that power of two beforehand (exact). Fields that straddle a half or a word (3-bit only) are
// shifted down, field_shift 0.
template <int BITS>
constexpr int field_shift(int j) {
  return (j * BITS) % 16 + BITS <= 16 ? (j * BITS) % 16 : 0;
}

// sum_j q_j * v[j] over one pack, v pre-scaled by 2^-field_shift; q_j is bits [j*BITS, (j+1)*BITS)
// of the words. No int->float conversion: OR-ing a field below 2^23 into the bits of 2^23 gives the
// float 2^23 + field exactly; subtracting 2^23 leaves the field. j is unrolled, so every word
// index, mask and branch is a compile-time constant.
template <int BITS>
inline float pack_dot(const thread uint32_t* w, const thread float* v) {
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  constexpr uint32_t MAGIC = 0x4B000000u;  // 2^23 as float bits
  uint32_t hi[BITS];
  for (int k = 0; k < BITS; ++k) hi[k] = w[k] >> 16;
  float acc = 0.f;
#pragma clang loop unroll(full)
  for (int j = 0; j < 32; ++j) {
    const int bit = j * BITS, word = bit / 32, off = bit % 32;
    uint32_t m;
    if (off % 16 + BITS <= 16) {
      m = (off < 16 ? w[word] : hi[word]) & (MASK << (off % 16));
    } else {
      m = w[word] >> off;
      if (off + BITS > 32) m |= w[word + 1] << (32 - off);
      m &= MASK;
    }
    acc = metal::fma(as_type<float>(m | MAGIC) - 8388608.f, v[j], acc);
  }
  return acc;
}

// The 32 activations of one pack, as floats scaled for pack_dot; returns their (unscaled) sum,
// the bias term's factor.
template <int BITS>
inline float scale_vals(thread float* v) {
  float s = 0.f;
#pragma clang loop unroll(full)
  for (int j = 0; j < 32; ++j) {
    s += v[j];
    v[j] *= 1.f / static_cast<float>(1 << field_shift<BITS>(j));
  }
  return s;
}

template <int BITS, typename T>
inline float load_vals(const device T* p, thread float* v) {
  for (int j = 0; j < 32; ++j) v[j] = static_cast<float>(p[j]);
  return scale_vals<BITS>(v);
}

inline float warp_sum(float v) {
  return metal::simd_sum(v);
}

}  // namespace flash_moe

// ===== gate_up =====
// template: T (x), S (scales, biases), BITS, GS, H (input size), I (rows per expert), ROWS
// grid: exactly N * I / ROWS warps (N = slots_shape[0] chosen experts)
using namespace flash_moe;
constexpr int WPR = H * BITS / 32;  // uint32 words per weight row
constexpr int GPR = H / GS;         // groups per row
constexpr int PACKS = H / 32;       // packs per row
const int lane = thread_index_in_simdgroup;
const int warp = thread_position_in_grid.x / 32;
const int row0 = warp * ROWS;       // row = e * I + i: chosen expert e, intermediate unit i
// the same rows of the bank slot holding expert e (ROWS divides I: a warp's rows share one expert)
const size_t src0 = static_cast<size_t>(slots[row0 / I]) * I + row0 % I;
float g[ROWS], u[ROWS];
for (int r = 0; r < ROWS; ++r) { g[r] = 0.f; u[r] = 0.f; }
for (int p = lane; p < PACKS; p += 32) {
  float v[32];
  const float vsum = load_vals<BITS>(x + p * 32, v);
  const int gi = p * 32 / GS;
  for (int r = 0; r < ROWS; ++r) {
    const size_t row = src0 + r;
    uint32_t w[BITS];
    load_pack<BITS>(gate_w + row * WPR + p * BITS, w);
    g[r] += static_cast<float>(gate_s[row * GPR + gi]) * pack_dot<BITS>(w, v)
          + static_cast<float>(gate_b[row * GPR + gi]) * vsum;
    load_pack<BITS>(up_w + row * WPR + p * BITS, w);
    u[r] += static_cast<float>(up_s[row * GPR + gi]) * pack_dot<BITS>(w, v)
          + static_cast<float>(up_b[row * GPR + gi]) * vsum;
  }
}
for (int r = 0; r < ROWS; ++r) {
  const float gr = warp_sum(g[r]), ur = warp_sum(u[r]);
  if (lane == 0) act[row0 + r] = gr / (1.f + metal::exp(-gr)) * ur;
}

// ===== down =====
// template: S, BITS, GS, H (rows per expert), I (input size), ROWS, WEIGHTED, O (output)
// grid: WEIGHTED: H / ROWS threadgroups of 8 simdgroups; the threadgroup's simdgroups split the
//       N = act_shape[0] experts and meet in threadgroup memory. Otherwise exactly N * H / ROWS
//       simdgroups, one expert each.
using namespace flash_moe;
constexpr int WPR = I * BITS / 32;
constexpr int GPR = I / GS;
constexpr int PACKS = I / 32;
constexpr int WARPS = 8;             // simdgroups per threadgroup in the WEIGHTED launch
constexpr int ROW_WARPS = H / ROWS;  // simdgroups per expert (unweighted)
const int lane = thread_index_in_simdgroup;
const int warp = thread_position_in_grid.x / 32;
const int h0 = WEIGHTED ? threadgroup_position_in_grid.x * ROWS : (warp % ROW_WARPS) * ROWS;
const int e_first = WEIGHTED ? thread_index_in_threadgroup / 32 : warp / ROW_WARPS;
const int e_step = WEIGHTED ? WARPS : 1;
const int e_last = WEIGHTED ? static_cast<int>(act_shape[0]) : e_first + 1;
threadgroup float partial[WARPS][ROWS];  // WEIGHTED: the warps' sums, per row
float acc[ROWS];
for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
for (int e = e_first; e < e_last; e += e_step) {
  const float score = WEIGHTED ? static_cast<float>(scores[e]) : 1.f;
  for (int p = lane; p < PACKS; p += 32) {
    float v[32];
    const float vsum = load_vals<BITS>(act + e * I + p * 32, v);
    const int gi = p * 32 / GS;
    for (int r = 0; r < ROWS; ++r) {
      const size_t row = static_cast<size_t>(slots[e]) * H + h0 + r;
      uint32_t w[BITS];
      load_pack<BITS>(down_w + row * WPR + p * BITS, w);
      acc[r] += score * (static_cast<float>(down_s[row * GPR + gi]) * pack_dot<BITS>(w, v)
                         + static_cast<float>(down_b[row * GPR + gi]) * vsum);
    }
  }
}
for (int r = 0; r < ROWS; ++r) acc[r] = warp_sum(acc[r]);
if constexpr (WEIGHTED) {
  if (lane == 0) {
    for (int r = 0; r < ROWS; ++r) partial[thread_index_in_threadgroup / 32][r] = acc[r];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (thread_index_in_threadgroup < ROWS) {
    float a = 0.f;
    for (int k = 0; k < WARPS; ++k) a += partial[k][thread_index_in_threadgroup];
    out[h0 + thread_index_in_threadgroup] = static_cast<O>(a);
  }
} else if (lane == 0) {
  for (int r = 0; r < ROWS; ++r) out[e_first * H + h0 + r] = static_cast<O>(acc[r]);
}
