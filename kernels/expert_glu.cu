// Fused routed-expert kernels for one token (decode), for mx.fast.cuda_kernel.
//
// This file holds three sections, split by the loader (llm_flash_moe.kernels) at the marker lines:
//   header   helpers, placed before the generated kernel functions
//   gate_up  kernel body: act[e, i] = silu(gate_e[i] . x) * (up_e[i] . x)          -> act [N, I] fp32
//   down     kernel body: out[h] = sum_e score_e * (down_e[h] . act[e])  (WEIGHTED) -> out [H]
//                         out[e, h] = down_e[h] . act[e]                  (otherwise) -> out [N, H]
// for the N chosen experts e, each read from the bank slot slots[e] of the weight arrays [slots, ...].
//
// Weights are MLX affine-quantized: w = scale * q + bias per group of GS inputs, q a BITS-bit field
// of a little-endian bit stream packed in uint32 words (BITS in 2, 3, 4, 8). A "pack" is 32
// consecutive inputs = BITS words; it always lies inside one group (GS is 32, 64 or 128).
// One warp computes ROWS output rows; lane l takes packs l, l + 32, ... of each row, so a warp reads
// each row as one contiguous run of memory; the partial sums meet in a warp reduction.
//
// The Metal mirror (expert_glu.metal) follows this file section by section, line for line.

// ===== header =====
// (mlx's default header already brings uint32_t, __nv_bfloat16, __half, float4, uint4.)

namespace flash_moe {

// One pack's BITS words (vector loads where the pack's size allows; rows are 16-byte aligned).
template <int BITS>
__device__ __forceinline__ void load_pack(const uint32_t* p, uint32_t (&w)[BITS]) {
  if constexpr (BITS == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x; w[1] = v.y;
  } else if constexpr (BITS == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  } else if constexpr (BITS == 8) {
    const uint4 a = reinterpret_cast<const uint4*>(p)[0];
    const uint4 b = reinterpret_cast<const uint4*>(p)[1];
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
    w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
  } else {
#pragma unroll
    for (int k = 0; k < BITS; ++k) w[k] = p[k];
  }
}

// Where value j of a pack sits: a field inside one 16-bit half of a word is read in place, masked
// but not shifted, so it comes out multiplied by 2^field_shift; the activation it meets is divided
// by that power of two beforehand (exact). Fields that straddle a half or a word (3-bit only) are
// shifted down, field_shift 0.
template <int BITS>
__host__ __device__ constexpr int field_shift(int j) {
  return (j * BITS) % 16 + BITS <= 16 ? (j * BITS) % 16 : 0;
}

// sum_j q_j * v[j] over one pack, v pre-scaled by 2^-field_shift; q_j is bits [j*BITS, (j+1)*BITS)
// of the words. No int->float conversion (quarter rate): OR-ing a field below 2^23 into the bits of
// 2^23 gives the float 2^23 + field exactly; subtracting 2^23 leaves the field. j is unrolled, so
// every word index, mask and branch is a compile-time constant: LOP3 + FADD + FFMA per value.
template <int BITS>
__device__ __forceinline__ float pack_dot(const uint32_t (&w)[BITS], const float (&v)[32]) {
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  constexpr uint32_t MAGIC = 0x4B000000u;  // 2^23 as float bits
  uint32_t hi[BITS];
#pragma unroll
  for (int k = 0; k < BITS; ++k) hi[k] = w[k] >> 16;
  float acc = 0.f;
#pragma unroll
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
    acc = fmaf(__uint_as_float(m | MAGIC) - 8388608.f, v[j], acc);
  }
  return acc;
}

// The 32 activations of one pack, as floats scaled for pack_dot; returns their (unscaled) sum,
// the bias term's factor.
template <int BITS>
__device__ __forceinline__ float scale_vals(float (&v)[32]) {
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    s += v[j];
    v[j] *= 1.f / static_cast<float>(1 << field_shift<BITS>(j));
  }
  return s;
}

template <int BITS>
__device__ __forceinline__ float load_vals(const float* p, float (&v)[32]) {
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float4 a = reinterpret_cast<const float4*>(p)[k];
    v[4 * k] = a.x; v[4 * k + 1] = a.y; v[4 * k + 2] = a.z; v[4 * k + 3] = a.w;
  }
  return scale_vals<BITS>(v);
}

// 16-bit activations (bf16, fp16): four 16-byte loads, two values per word.
__device__ __forceinline__ float2 unpack2(uint32_t u, const __nv_bfloat16*) {
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}

__device__ __forceinline__ float2 unpack2(uint32_t u, const __half*) {
  return __half22float2(*reinterpret_cast<const __half2*>(&u));
}

template <int BITS, typename T>
__device__ __forceinline__ float load_vals(const T* p, float (&v)[32]) {
  static_assert(sizeof(T) == 2, "activations are fp32, bf16 or fp16");
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint4 a = reinterpret_cast<const uint4*>(p)[k];
    const uint32_t u[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const float2 f = unpack2(u[m], p);
      v[8 * k + 2 * m] = f.x;
      v[8 * k + 2 * m + 1] = f.y;
    }
  }
  return scale_vals<BITS>(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace flash_moe

// ===== gate_up =====
// template: T (x), S (scales, biases), BITS, GS, H (input size), I (rows per expert), ROWS
// grid: exactly N * I / ROWS warps (N = slots_shape[0] chosen experts)
using namespace flash_moe;
constexpr int WPR = H * BITS / 32;  // uint32 words per weight row
constexpr int GPR = H / GS;         // groups per row
constexpr int PACKS = H / 32;       // packs per row
const int lane = threadIdx.x % 32;
const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
const int row0 = warp * ROWS;       // row = e * I + i: chosen expert e, intermediate unit i
// the same rows of the bank slot holding expert e (ROWS divides I: a warp's rows share one expert)
const size_t src0 = static_cast<size_t>(slots[row0 / I]) * I + row0 % I;
float g[ROWS], u[ROWS];
#pragma unroll
for (int r = 0; r < ROWS; ++r) { g[r] = 0.f; u[r] = 0.f; }
for (int p = lane; p < PACKS; p += 32) {
  float v[32];
  const float vsum = load_vals<BITS>(x + p * 32, v);
  const int gi = p * 32 / GS;
#pragma unroll
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
#pragma unroll
for (int r = 0; r < ROWS; ++r) {
  const float gr = warp_sum(g[r]), ur = warp_sum(u[r]);
  if (lane == 0) act[row0 + r] = gr / (1.f + expf(-gr)) * ur;
}

// ===== down =====
// template: S, BITS, GS, H (rows per expert), I (input size), ROWS, WEIGHTED, O (output)
// grid: WEIGHTED: H / ROWS blocks of 8 warps; the block's warps split the N = act_shape[0] experts
//       and meet in shared memory. Otherwise exactly N * H / ROWS warps, one expert each.
using namespace flash_moe;
constexpr int WPR = I * BITS / 32;
constexpr int GPR = I / GS;
constexpr int PACKS = I / 32;
constexpr int WARPS = 8;             // warps per block in the WEIGHTED launch
constexpr int ROW_WARPS = H / ROWS;  // warps per expert (unweighted)
const int lane = threadIdx.x % 32;
const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
const int h0 = WEIGHTED ? blockIdx.x * ROWS : (warp % ROW_WARPS) * ROWS;
const int e_first = WEIGHTED ? threadIdx.x / 32 : warp / ROW_WARPS;
const int e_step = WEIGHTED ? WARPS : 1;
const int e_last = WEIGHTED ? static_cast<int>(act_shape[0]) : e_first + 1;
__shared__ float partial[WARPS][ROWS];  // WEIGHTED: the warps' sums, per row
float acc[ROWS];
#pragma unroll
for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
for (int e = e_first; e < e_last; e += e_step) {
  const float score = WEIGHTED ? static_cast<float>(scores[e]) : 1.f;
  for (int p = lane; p < PACKS; p += 32) {
    float v[32];
    const float vsum = load_vals<BITS>(act + e * I + p * 32, v);
    const int gi = p * 32 / GS;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const size_t row = static_cast<size_t>(slots[e]) * H + h0 + r;
      uint32_t w[BITS];
      load_pack<BITS>(down_w + row * WPR + p * BITS, w);
      acc[r] += score * (static_cast<float>(down_s[row * GPR + gi]) * pack_dot<BITS>(w, v)
                         + static_cast<float>(down_b[row * GPR + gi]) * vsum);
    }
  }
}
#pragma unroll
for (int r = 0; r < ROWS; ++r) acc[r] = warp_sum(acc[r]);
if constexpr (WEIGHTED) {
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) partial[threadIdx.x / 32][r] = acc[r];
  }
  __syncthreads();
  if (threadIdx.x < ROWS) {
    float a = 0.f;
#pragma unroll
    for (int k = 0; k < WARPS; ++k) a += partial[k][threadIdx.x];
    out[h0 + threadIdx.x] = static_cast<O>(a);
  }
} else if (lane == 0) {
#pragma unroll
  for (int r = 0; r < ROWS; ++r) out[e_first * H + h0 + r] = static_cast<O>(acc[r]);
}
