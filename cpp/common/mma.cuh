// Warp-level tensor-core primitives at the PTX level (sm_80+): mma.sync m16n8k16 (bf16 or fp16
// in, fp32 accumulate), ldmatrix (x1/x2/x4, optionally .trans), 16-byte cp.async and pack2; and
// shared -> global row copies that use Hopper's bulk copies on sm_90 and plain stores elsewhere.
// Unlike WMMA, these fragments have the hardware's documented lane <-> element mapping, so code
// may rely on which lane owns which element (row reductions of an accumulator, reusing an fp32
// accumulator as the A operand of the next mma via pack2, ...).
//
// Fragments (PTX ISA, "Matrix fragments for mma.m16n8k16"), g = lane >> 2, t = lane & 3. A
// 32-bit register holds two 16-bit elements, the lower-index one in the low 16 bits:
//   A 16x16 (row):  a0 = A[g][2t, 2t+1]    a1 = A[g+8][2t, 2t+1]
//                   a2 = A[g][2t+8, 2t+9]  a3 = A[g+8][2t+8, 2t+9]
//   B 16x8 (col):   b0 = B[2t, 2t+1][g]    b1 = B[2t+8, 2t+9][g]
//   C/D 16x8 fp32:  c0, c1 = C[g][2t], C[g][2t+1]    c2, c3 = C[g+8][2t], C[g+8][2t+1]
// ldmatrix (m8n8, b16): lanes 8j..8j+7 pass the addresses of rows 0..7 of 8x8 matrix j (16
// bytes each, 16-byte aligned, shared memory; x2 reads lanes 0-15, x1 lanes 0-7, the other
// lanes' addresses are ignored); lane l receives in r[j] row l>>2, cols 2(l&3), 2(l&3)+1 of
// matrix j -- with .trans of its transpose, i.e. rows 2(l&3), 2(l&3)+1 of column l>>2. Hence,
// for tiles in shared memory with a leading dimension of ld elements (ld * 2 a multiple of 16):
//   A 16x16 row-major at sA:            ldmatrix_x4(a, sA + (lane % 16) * ld + (lane / 16) * 8)
//   B 16x8 stored k-major (B[k][n]):    ldmatrix_x2_trans(b, sB + (lane % 16) * ld)
//   B 16x8 stored n-major (B^T[n][k]):  ldmatrix_x2(b, sBt + (lane % 8) * ld + (lane / 8 % 2) * 8)
// and an accumulator pair (two 16x8 tiles c, c' side by side) is the A fragment of a 16x16
// tile: a = {pack2(c0, c1), pack2(c2, c3), pack2(c'0, c'1), pack2(c'2, c'3)}.
//
// cp.async: cp_async16 starts a 16-byte global -> shared copy (both 16-byte aligned; valid ==
// false zero-fills the destination and reads nothing); cp_async_commit closes the thread's
// current group of copies; cp_async_wait<N> waits until at most the N most recent committed
// groups are pending. The wait covers only the calling thread's own copies: other threads'
// data needs a __syncthreads (or __syncwarp) after their wait, as usual.
//
// CUDA: inline PTX, asm volatile (as in CUTLASS: never dropped or merged). ldmatrix has no
// "memory" clobber (as in CUTLASS): order the shared-memory stores it reads with __syncwarp /
// __syncthreads, which CUDA requires anyway; cp_async_wait has one, so the thread's own loads
// of the copied data are not hoisted above it.
// PANTHER_CUDA_EMU (tests/emu/cuda_emu.h): the same mappings in C++, built on
// emu::warp_allgather.
//  * ldmatrix / mma_16816 are warp collectives (every live lane, same order). ldmatrix gathers
//    the 32 addresses (one barrier), checks that the used ones are 16-byte aligned rows of the
//    block's shared memory (else std::invalid_argument from every lane), reads, and ends with a
//    warp barrier, so it behaves as one warp-wide instruction: stores made by the warp before
//    the call are seen and no lane overwrites the rows before every lane has read them.
//  * mma_16816 gathers the A/B registers (3 barriers) and computes each output as
//    c + sum_k a*b, k ascending, in double (products exact; the sum too unless the terms differ
//    in magnitude by more than ~2^25), rounded once to float: normally the correctly rounded
//    result. Tensor cores round/truncate partial sums differently, so kernels compared with
//    hardware need a fp32-level tolerance (small-integer data is exact on both).
//  * cp.async is deferred, to expose a missing or too-lax wait: cp_async16 checks and records
//    the copy, cp_async_commit closes the group, cp_async_wait<N> performs (memcpy / zero-fill)
//    all but the N most recent groups. Uncommitted copies are never performed by a wait (as in
//    PTX, where only committed groups are waited for); copies still pending at thread exit are
//    dropped.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/device.cuh"

#ifdef PANTHER_CUDA_EMU
#include <deque>
#include <vector>
#endif

namespace panther::mma {

template <class T>
inline constexpr bool kMmaType = std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

// Two floats rounded (to nearest even) to T = __nv_bfloat16 or __half, lo in the low 16 bits.
template <class T>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  static_assert(kMmaType<T>, "pack2: T must be __nv_bfloat16 or __half");
  unsigned u;
#ifdef PANTHER_CUDA_EMU
  const T v[2] = {T(lo), T(hi)};  // c10 conversions round to nearest even
  std::memcpy(&u, v, 4);
#else
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo, at the lower address
    std::memcpy(&u, &v, 4);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    std::memcpy(&u, &v, 4);
  }
#endif
  return u;
}

// 4-byte store of a pack2 pair (dst 4-byte aligned; memcpy under the emulator, which builds
// with strict aliasing).
__device__ __forceinline__ void store_pair(void* dst, unsigned u) {
#ifdef PANTHER_CUDA_EMU
  std::memcpy(dst, &u, 4);
#else
  *reinterpret_cast<unsigned*>(dst) = u;
#endif
}

// 16-byte move between addresses the caller knows to be 16-byte aligned (memcpy under the
// emulator, which builds with strict aliasing).
__device__ __forceinline__ void move16(void* dst, const void* src) {
#ifdef PANTHER_CUDA_EMU
  std::memcpy(dst, src, 16);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

// Whether a (host) pointer is 16-byte aligned, as move16 and cp_async16 need.
inline bool aligned16(const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; }

// Bulk copies (Hopper's copy engine, cp.async.bulk: sm_90 and newer only). Device code compiled
// for an architecture below 9.0 has no bulk-copy instruction at all (PANTHER_HAS_BULK_COPY is
// undefined there) and always takes the portable path; on 9.0 the `bulk` argument chooses at
// run time (false: the portable path, e.g. under PANTHER_PORTABLE_KERNELS=1, see
// panther::portable_kernels in launch.cuh). The emulator copies at once (memcpy).
#if !defined(PANTHER_CUDA_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PANTHER_HAS_BULK_COPY 1
#endif

// Copy of `bytes` (a multiple of 16; both addresses 16-byte aligned) from shared to global
// memory. bulk (sm_90): asynchronous, by the copy engine: bulk_store_commit closes this thread's
// group and bulk_store_wait_read waits until the sources of its groups have been read (before
// that shared memory is written again or the block exits); shared memory written by ordinary
// stores must be published to the copy engine first: a barrier, then bulk_store_fence in the
// issuing thread. Portable (otherwise): this thread copies with 16-byte loads and stores, done on
// return; fence, commit and wait do nothing. Callers use the same sequence for both.
__device__ __forceinline__ void bulk_store_fence(bool bulk) {
#ifdef PANTHER_HAS_BULK_COPY
  if (bulk) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  (void)bulk;
#endif
}
__device__ __forceinline__ void bulk_store(void* gmem, const void* smem, unsigned bytes, bool bulk) {
#ifdef PANTHER_CUDA_EMU
  (void)bulk;
  if (reinterpret_cast<uintptr_t>(smem) % 16 || reinterpret_cast<uintptr_t>(gmem) % 16 ||
      bytes % 16 || !emu::in_block_smem(smem, bytes))
    throw std::invalid_argument("bulk_store: needs 16-byte aligned shared source, global "
                                "destination and size");
  std::memcpy(gmem, smem, bytes);
#else
#ifdef PANTHER_HAS_BULK_COPY
  if (bulk) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(
                     __cvta_generic_to_global(gmem)),
                 "r"(static_cast<unsigned>(__cvta_generic_to_shared(smem))), "r"(bytes)
                 : "memory");
    return;
  }
#else
  (void)bulk;
#endif
  const uint4* src = static_cast<const uint4*>(smem);
  uint4* dst = static_cast<uint4*>(gmem);
  for (unsigned i = 0; i < bytes / 16; ++i) dst[i] = src[i];
#endif
}
__device__ __forceinline__ void bulk_store_commit(bool bulk) {
#ifdef PANTHER_HAS_BULK_COPY
  if (bulk) asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#else
  (void)bulk;
#endif
}
__device__ __forceinline__ void bulk_store_wait_read(bool bulk) {
#ifdef PANTHER_HAS_BULK_COPY
  if (bulk) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
#else
  (void)bulk;
#endif
}

// d = a * b + c for one m16n8k16 tile (layouts above); T = __nv_bfloat16 or __half. d may be c.
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                          const float (&c)[4]) {
  static_assert(kMmaType<T>, "mma_16816: T must be __nv_bfloat16 or __half");
#ifdef PANTHER_CUDA_EMU
  struct Regs { unsigned a[4], b[2]; };
  Regs mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  const auto all = emu::warp_allgather(mine);
  auto val = [](unsigned reg, int k) {  // element of a register; k odd -> high half
    const uint16_t bits = uint16_t(reg >> (16 * (k & 1)));
    T x;
    std::memcpy(&x, &bits, 2);
    return double(float(x));
  };
  // A[r][k]: lane (r % 8) * 4 + (k % 8) / 2, register (r / 8) + 2 (k / 8); B[k][n]: lane
  // n * 4 + (k % 8) / 2, register k / 8.
  auto A = [&](int r, int k) { return val(all[(r % 8) * 4 + (k % 8) / 2].a[r / 8 + 2 * (k / 8)], k); };
  auto B = [&](int k, int n) { return val(all[n * 4 + (k % 8) / 2].b[k / 8], k); };
  const int g = int(emu::lane_id()) >> 2, t = int(emu::lane_id()) & 3;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i / 2), n = 2 * t + i % 2;
    double s = c[i];
    for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, n);
    out[i] = float(s);
  }
  std::memcpy(d, out, sizeof(out));
#else
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

namespace detail {
// N = 1, 2, 4 matrices; p: this lane's row address (see the top comment).
template <int N, bool Trans>
__device__ __forceinline__ void ldmatrix(unsigned (&r)[N], const void* p) {
  static_assert(N == 1 || N == 2 || N == 4);
#ifdef PANTHER_CUDA_EMU
  const auto rows = emu::warp_allgather(p);  // rows[8j + i]: row i of matrix j
  for (int i = 0; i < 8 * N; ++i)
    if (reinterpret_cast<uintptr_t>(rows[i]) % 16 || !emu::in_block_smem(rows[i], 16))
      throw std::invalid_argument("ldmatrix: row addresses must be 16-byte aligned shared memory");
  const int l = int(emu::lane_id());
  for (int j = 0; j < N; ++j) {
    const unsigned char* m[8];
    for (int i = 0; i < 8; ++i) m[i] = static_cast<const unsigned char*>(rows[8 * j + i]);
    uint16_t e[2];
    for (int h = 0; h < 2; ++h)  // element (row, col) of matrix j is at m[row] + 2 col
      std::memcpy(&e[h], Trans ? m[2 * (l & 3) + h] + 2 * (l >> 2) : m[l >> 2] + 2 * (2 * (l & 3) + h), 2);
    r[j] = unsigned(e[0]) | unsigned(e[1]) << 16;
  }
  emu::warp_barrier();
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  if constexpr (N == 4 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  else if constexpr (N == 4)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  else if constexpr (N == 2 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  else if constexpr (N == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  else if constexpr (!Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s));
#endif
}

#ifdef PANTHER_CUDA_EMU
struct AsyncCopy { void* dst; const void* src; };  // src == nullptr: zero-fill
struct AsyncState {
  std::vector<AsyncCopy> open;                // issued, not yet committed
  std::deque<std::vector<AsyncCopy>> groups;  // committed, oldest first
};
inline thread_local AsyncState async_state;   // per emulated thread (a fresh std::thread each)
#endif
}  // namespace detail

__device__ __forceinline__ void ldmatrix_x1(unsigned (&r)[1], const void* p) { detail::ldmatrix<1, false>(r, p); }
__device__ __forceinline__ void ldmatrix_x2(unsigned (&r)[2], const void* p) { detail::ldmatrix<2, false>(r, p); }
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) { detail::ldmatrix<4, false>(r, p); }
__device__ __forceinline__ void ldmatrix_x1_trans(unsigned (&r)[1], const void* p) { detail::ldmatrix<1, true>(r, p); }
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned (&r)[2], const void* p) { detail::ldmatrix<2, true>(r, p); }
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) { detail::ldmatrix<4, true>(r, p); }

// 16 bytes global -> shared, asynchronous; !valid: zero-fill (gmem is not read, any pointer).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#ifdef PANTHER_CUDA_EMU
  if (reinterpret_cast<uintptr_t>(smem) % 16 || !emu::in_block_smem(smem, 16) ||
      (valid && reinterpret_cast<uintptr_t>(gmem) % 16))
    throw std::invalid_argument("cp_async16: needs 16-byte aligned shared destination and global source");
  detail::async_state.open.push_back({smem, valid ? gmem : nullptr});
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(smem))),
               "l"(__cvta_generic_to_global(gmem)), "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef PANTHER_CUDA_EMU
  auto& st = detail::async_state;
  st.groups.push_back(std::move(st.open));
  st.open.clear();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N of this thread's committed groups are pending (no barrier: see above).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0);
#ifdef PANTHER_CUDA_EMU
  auto& st = detail::async_state;
  for (; st.groups.size() > size_t(N); st.groups.pop_front())
    for (const auto& cp : st.groups.front())
      cp.src ? (void)std::memcpy(cp.dst, cp.src, 16) : (void)std::memset(cp.dst, 0, 16);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace panther::mma
