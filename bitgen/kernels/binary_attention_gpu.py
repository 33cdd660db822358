"""Binary attention on Hopper GPUs (Mosaic GPU): warp-specialised flash attention with 8-bit +-1 scores.

One CTA takes compute_wgs * block_q queries of one (batch, head): warpgroups 0 .. compute_wgs - 1
compute (block_q rows each; where the length is not a multiple of the CTA's rows, the last CTA's
spare warpgroups recompute the last block and store nothing), the last warpgroup streams K, V (and
per-token key scales, key segment ids) into a ring of `max_concurrent_steps` shared-memory slots
with the bulk-copy engine. Per key block a compute warpgroup runs
  1. S = sign(q) sign(k)^T on the tensor cores, 8-bit operands at twice the bf16 rate: fp8 e4m3
     with f32 accumulators (exact: |S| <= H; no int -> float conversion) or s8 -> s32,
  2. x = S * f - shift in base 2, f = s_q s_k log2(e) / sqrt(H) (one scalar per head for per-head
     scales, row x column factors per token), then the causal mask (key blocks past the diagonal
     are skipped) or the segment mask (query i sees key j iff seg[j] <= seg[i]; every block runs),
  3. p = exp2(x), l += sum(p), O += P V on the tensor cores (P in V's dtype).
Bounded softmax: |S| <= H bounds every row maximum by shift = H * f (per token: H * f_row *
max f_col), so the running max, its exp2 rescale of O and l and the row-max reductions drop out.
Softmax is shift invariant, so this is exact unless exp2 underflows; every p >= 2^-(2 shift), so
a (batch, head) takes this path only where 2 * shift <= _BOUND_LIMIT[V dtype] (P stays a normal
number), decided inside the kernel; other heads run the online-max loop.

The forward kernel behind `binary_attention(..., implementation="pallas_gpu")`, which binarises
q and k (`_binarize`) around it.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from bitgen.kernels._binarize import kernel_factors


@dataclasses.dataclass(frozen=True)
class GpuTuning:
  # block_kv 128 beats 64 by ~20% and 3 slots beat 2 (H100, bench --tune); larger tiles were slower.
  block_q: int = 64
  block_kv: int = 128
  max_concurrent_steps: int = 3
  # Compute warpgroups a CTA (block_q query rows each): 2 or 3.
  compute_wgs: int = 2
  # Ping-pong two compute warpgroups (one runs its softmax while the other uses the tensor
  # cores), through a 2-arrival rendezvous barrier, as FlashAttention-3 does.
  schedule_barrier: bool = True
  # Issue block j - 1's P V together with block j's Q K and wait once for both (one tensor-core
  # round trip a step instead of two); the other warpgroups cover the softmax.
  skew_pv: bool = False
  # Measured on H100 (bench --tune, B=4 T=4096 N=16 H=64, kernel only), 2026-11-22: int8 with the
  # online max 0.789 ms, fp8 with the online max 0.680, fp8 bounded 0.588, + 32 polynomial
  # exp2 columns 0.637, + fp8 P V 0.833 (max err 4.3e-3 vs 3.7e-4).
  # Operand type of the +-1 scores: "float8_e4m3fn" (f32 accumulators) or "int8" (s32, converted).
  qk_dtype: str = "float8_e4m3fn"
  # Use the static score bound instead of the running max where it cannot underflow (see above).
  bounded_softmax: bool = True
  # The last `poly_exp_cols` columns of each unmasked key block take exp2 as a polynomial on the FMA
  # pipes instead of the MUFU unit (FlashAttention-4's split), 0 = all on the MUFU. Slower at 32.
  poly_exp_cols: int = 0
  # 8-bit P V (the paper's option): P and V in fp8 e4m3 at twice the bf16 MMA rate. P = 2^(x - m + 8)
  # is written to shared memory (8-bit A operands must be K-major), V is pre-scaled per (batch,
  # head) by a power of two into e4m3's range and transposed (K-major) by XLA. Costs accuracy and,
  # measured, time (the shared-memory round trip of P outweighs the faster MMA): off.
  pv_fp8: bool = False


def default_tuning(head_dim: int) -> GpuTuning:
  """H <= 64: three free-running compute warpgroups, 4 slots, skewed P V (H100, B=4 T=4096 N=16:
  0.50-0.53 ms against 0.59 for two in ping-pong); H = 128 keeps two (three: 1.17 against 0.78 ms,
  as 512 threads leave 128 registers a thread)."""
  if head_dim <= 64:
    return GpuTuning(compute_wgs=3, schedule_barrier=False, max_concurrent_steps=4, skew_pv=True)
  return GpuTuning()


QK_DTYPES = {"float8_e4m3fn": jnp.float8_e4m3fn, "int8": jnp.int8}
# 2 * shift above which a bounded p = 2^(x - shift) could leave V's dtype's normal range.
_BOUND_LIMIT = {jnp.dtype(jnp.bfloat16): 100.0, jnp.dtype(jnp.float16): 14.0,
                jnp.dtype(jnp.float8_e4m3fn): 14.0}
# fp8 P is scaled by 2^_FP8_P_EXPONENT (cancels in O / l): p in (2^-6, 2^8], e4m3's normal range.
_FP8_P_EXPONENT = 8.0
# Scale factors are floored here so that a zero scale never multiplies a masked -inf into NaN.
_MIN_FACTOR = 1e-30
# Registers a thread after `set_max_registers`, by compute warpgroups: compute, memory warpgroup
# (at most 64K a CTA).
_COMPUTE_REGISTERS = {2: 232, 3: 160}
_MEMORY_REGISTERS = {2: 40, 3: 24}
# Per-(batch, head) constants are padded to 128 bytes: bulk copies into shared memory need
# 128-byte aligned destinations.
_CONSTS_WIDTH = 32
# Bulk copies a compute warpgroup makes before its loop (a barrier each): q, constants, per-token
# row factors and row shifts, segment ids.
_Q_COPIES = 5


def unsupported_reason(q, k, v) -> str | None:
  """Why the kernel cannot take these inputs, or None."""
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  t = GpuTuning()  # block sizes: the same in every default
  if v.dtype not in (jnp.bfloat16, jnp.float16):
    return f"V dtype {v.dtype} (the GPU kernel multiplies P V in bf16/f16; f32 takes the reference)"
  if q_len % t.block_q or kv_len % t.block_kv:
    return f"lengths T={q_len}, S={kv_len} must be multiples of {t.block_q} and {t.block_kv}"
  return None


def _smem_transforms(dtype, head_dim):
  from jax.experimental.pallas import mosaic_gpu as plgpu
  row_bytes = head_dim * jnp.dtype(dtype).itemsize
  swizzle = min(128, row_bytes)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


# 1.5 * 2^23: for |x| < 2^22, x + _ROUND_MAGIC rounds x to an integer r held in the low mantissa
# bits, and (bits << 23) is r << 23 (mod 2^32), the exponent increment of 2^r.
_ROUND_MAGIC = 12582912.0
# 2^f on [-1/2, 1/2], least squares in relative error: max relative error 7.7e-5 (bf16 P: 3.9e-3).
_EXP2_POLY = (0.9999289403695113, 0.6932762416819607, 0.24260405145947916, 0.0550886838075115)


def _exp2_fma(x):
  """exp2 for x <= 0 on the FMA/ALU pipes: 2^round(x) by exponent bits times a cubic in the rest."""
  x = jnp.maximum(x, -126.0)  # keeps the biased exponent of the result >= 0
  t = x + _ROUND_MAGIC
  f = x - (t - _ROUND_MAGIC)  # in [-1/2, 1/2]
  c0, c1, c2, c3 = _EXP2_POLY
  poly = ((c3 * f + c2) * f + c1) * f + c0
  bits = lax.bitcast_convert_type(poly, jnp.int32) + lax.shift_left(
      lax.bitcast_convert_type(t, jnp.int32), jnp.int32(23))
  return lax.bitcast_convert_type(bits, jnp.float32)


def _gpu_factors(q_scale, k_scale, p_dtype, v_scale, batch, q_len, kv_len, heads, head_dim):
  """Kernel constants. Per (batch, head): (factor, shift, use_bound, v_scale, 0...) as [B, N, 32]; per
  token also row factors and row shifts [B, N, T] and column factors [B, N, S] (else None)."""
  row, col = kernel_factors(q_scale, k_scale, batch, q_len, kv_len, heads, head_dim)
  row = jnp.maximum(row * math.log2(math.e), _MIN_FACTOR)  # [B, N, T]
  if q_scale.shape[1] == 1:  # per-head scales: one factor per (batch, head)
    factor = jnp.maximum(row[..., 0] * col[..., 0], _MIN_FACTOR)  # [B, N]
    shift = head_dim * factor
    vectors = None
  else:
    row_shift = head_dim * row * col.max(axis=-1, keepdims=True)  # [B, N, T]
    shift = row_shift.max(axis=-1)
    factor = jnp.ones_like(shift)
    vectors = (row, row_shift, col)
  use_bound = (2 * shift <= _BOUND_LIMIT[jnp.dtype(p_dtype)]).astype(jnp.float32)
  consts = jnp.stack([factor, shift, use_bound, jnp.broadcast_to(v_scale, shift.shape)], axis=-1)
  consts = jnp.pad(consts, ((0, 0), (0, 0), (0, _CONSTS_WIDTH - 4)))
  return consts, vectors


def binary_attention_gpu(q_sign, q_scale, k_sign, k_scale, v, segments, *, causal,
                 tuning: GpuTuning | None = None):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  batch, q_len, heads, head_dim = q_sign.shape
  kv_len = k_sign.shape[1]
  tuning = tuning or default_tuning(head_dim)
  block_q, block_kv, steps = tuning.block_q, tuning.block_kv, tuning.max_concurrent_steps
  if tuning.qk_dtype not in QK_DTYPES:
    raise ValueError(f"qk_dtype must be one of {tuple(QK_DTYPES)}, got {tuning.qk_dtype!r}")
  if tuning.poly_exp_cols % 8 or not 0 <= tuning.poly_exp_cols < block_kv:
    raise ValueError(f"poly_exp_cols must be a multiple of 8 below {block_kv}, got "
                     f"{tuning.poly_exp_cols}")
  wgs = tuning.compute_wgs
  if wgs not in (2, 3) or (tuning.schedule_barrier and wgs != 2):
    raise ValueError(f"compute_wgs must be 2 or 3 (the ping-pong schedule takes 2), got {wgs} with "
                     f"schedule_barrier={tuning.schedule_barrier}")
  if tuning.skew_pv and (tuning.schedule_barrier or tuning.pv_fp8):
    raise ValueError("skew_pv takes neither the ping-pong schedule_barrier nor pv_fp8")
  qk_dtype = QK_DTYPES[tuning.qk_dtype]
  acc_dtype = jnp.int32 if qk_dtype == jnp.int8 else jnp.float32
  dtype = v.dtype
  if tuning.pv_fp8:
    # Power-of-two scale per (batch, head) into e4m3's range (max 448), V^T [B, N, H, S] K-major.
    amax = jnp.max(jnp.abs(v.astype(jnp.float32)), axis=(1, 3))  # [B, N]
    v_scale = jnp.exp2(jnp.ceil(jnp.log2(jnp.maximum(amax, 1e-30) / 256)))
    v_in = jnp.transpose(v.astype(jnp.float32) / v_scale[:, None, :, None], (0, 2, 3, 1))
    v_in = v_in.astype(jnp.float8_e4m3fn)
    p_dtype, p_offset = jnp.float8_e4m3fn, _FP8_P_EXPONENT
  else:
    v_in, v_scale, p_dtype, p_offset = v, jnp.float32(1), dtype, 0.0
  consts, vectors = _gpu_factors(q_scale, k_scale, p_dtype, v_scale, batch, q_len, kv_len, heads,
                                 head_dim)
  per_token = vectors is not None
  # Segment ids [B, T] (block-causal: query i sees key j iff seg[j] <= seg[i]); causal arrives as
  # arange segments and takes the cheaper iota mask with its block skipping instead.
  segmented = segments is not None and not causal
  q8, k8 = q_sign.astype(qk_dtype), k_sign.astype(qk_dtype)
  num_kv_blocks = kv_len // block_kv
  cta_rows = wgs * block_q
  row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

  def kernel(q_ref, k_ref, v_ref, consts_ref, seg_ref, vector_refs, out_ref, scoped):
    b, n, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    smem, barriers = scoped
    (q_smem2, o_smem2, k_smem, v_smem, p_smem2, consts_smem2, rows_smem2, col_smem, q_seg_smem2,
     k_seg_smem) = smem
    (q_barriers, k_barriers, v_barriers, col_barriers, seg_barriers, k_consumed, v_consumed,
     schedule) = barriers

    def rendezvous():
      if tuning.schedule_barrier:
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)
    if causal:
      max_kv_steps = jnp.minimum(pl.cdiv(jnp.minimum((tile + 1) * cta_rows, q_len),
                                         jnp.array(block_kv, jnp.int32)), num_kv_blocks)
    else:
      max_kv_steps = num_kv_blocks

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(_COMPUTE_REGISTERS[wgs], action="increase")
      q_smem, o_smem, consts_smem = q_smem2.at[wg], o_smem2.at[wg], consts_smem2.at[wg]
      # Past the end (the last CTA of a ragged length): recompute the last block, store nothing.
      q_base = jnp.minimum(tile * cta_rows + wg * block_q, q_len - block_q)
      owns_rows = tile * cta_rows + wg * block_q < q_len
      copies = [(q_ref.at[b, pl.ds(q_base, block_q), n], q_smem),
                (consts_ref.at[b, n], consts_smem)]
      if per_token:
        row_ref, shift_ref, _ = vector_refs
        copies += [(row_ref.at[b, n, pl.ds(q_base, block_q)], rows_smem2.at[wg, 0]),
                   (shift_ref.at[b, n, pl.ds(q_base, block_q)], rows_smem2.at[wg, 1])]
      if segmented:
        copies.append((seg_ref.at[b, pl.ds(q_base, block_q)], q_seg_smem2.at[wg]))
      for i, (src, dst) in enumerate(copies):
        plgpu.copy_gmem_to_smem(src, dst, q_barriers.at[wg * _Q_COPIES + i])
      for i in range(len(copies)):
        plgpu.barrier_wait(q_barriers.at[wg * _Q_COPIES + i])
      if segmented:
        q_seg = plgpu.load(q_seg_smem2.at[wg], layout=row_layout)
      factor, shift, use_bound = consts_smem[0], consts_smem[1] - p_offset, consts_smem[2]
      if per_token:
        row_factor = plgpu.load(rows_smem2.at[wg, 0], layout=row_layout)
        row_shift = plgpu.load(rows_smem2.at[wg, 1], layout=row_layout) - p_offset
      m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), row_layout)
      l_i = plgpu.layout_cast(jnp.full((block_q,), 0, jnp.float32), row_layout)
      acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
      kv_steps = (pl.cdiv(q_base + block_q, jnp.array(block_kv, jnp.int32)) if causal
                  else max_kv_steps)

      def pv(p, slot, acc_ref):
        if tuning.pv_fp8:
          plgpu.wgmma(acc_ref, p_smem2.at[wg], v_smem.at[slot].transpose((1, 0)))
        else:
          plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])

      def kv_step(step, carry, *, masked, bounded, first=False):
        acc, m_i, l_i, *p_prev = carry  # p_prev: [p of block step - 1] with skew_pv
        skewed = tuning.skew_pv and not first
        slot = lax.rem(step, jnp.array(steps, step.dtype))
        prev_slot = lax.rem(step + steps - 1, jnp.array(steps, step.dtype))
        plgpu.barrier_wait(k_barriers.at[slot])
        if per_token:
          plgpu.barrier_wait(col_barriers.at[slot])
        if segmented:
          plgpu.barrier_wait(seg_barriers.at[slot])

        def scores(acc_ref):  # 1. [block_q, block_kv], exact
          plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          new_acc = (pl.run_state(functools.partial(pv, p_prev[0], prev_slot))(
              plgpu.ACC.init(acc)) if skewed else acc)
          rendezvous()
          return acc_ref[...], new_acc
        s, acc = pl.run_scoped(scores, plgpu.ACC((block_q, block_kv), acc_dtype))
        if skewed:
          plgpu.barrier_arrive(v_consumed.at[prev_slot])
        if per_token:
          col_factor = plgpu.load(col_smem.at[slot], layout=col_layout)
        if segmented:
          k_seg = plgpu.load(k_seg_smem.at[slot], layout=col_layout)
        plgpu.barrier_arrive(k_consumed.at[slot])
        # 2. Base-2 logits x = s * f (per token: s * f_col first, f_row below).
        s = s.astype(jnp.float32)
        if per_token:
          s = s * lax.broadcast_in_dim(col_factor, s.shape, [1])
        if masked:
          q_ids = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
          kv_ids = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
          s = jnp.where(q_ids + q_base >= kv_ids + step * block_kv, s, -jnp.inf)
        if segmented:
          visible = (lax.broadcast_in_dim(q_seg, s.shape, [0]) >=
                     lax.broadcast_in_dim(k_seg, s.shape, [1]))
          s = jnp.where(visible, s, -jnp.inf)
        row = lambda x, shape=s.shape: lax.broadcast_in_dim(x, shape, [0])
        # 3. p = exp2(x - m) with m the bound or the running max (f > 0: max(s f) = f max(s)).
        if bounded:
          m_new = m_i
          x = s * row(row_factor) - row(row_shift) if per_token else s * factor - shift
        else:
          s_max = s.max(axis=1)
          m_new = jnp.maximum(m_i, s_max * row_factor if per_token else s_max * factor)
          if segmented:  # segments can hide all keys so far from a row: no -inf - -inf below
            m_new = jnp.maximum(m_new, -1e30)
          x = s * (row(row_factor) if per_token else factor) - row(m_new - p_offset)
        split = block_kv - tuning.poly_exp_cols
        if tuning.poly_exp_cols and not (masked or segmented):  # the polynomial maps -inf to 2^-126
          p = jnp.concatenate([jnp.exp2(x[:, :split]), _exp2_fma(x[:, split:])], axis=1)
        else:
          p = jnp.exp2(x)
        if bounded:
          l_i = l_i + p.sum(axis=1)
        else:
          alpha = jnp.exp2(m_i - m_new)
          l_i = l_i * alpha + p.sum(axis=1)
          acc = acc * row(alpha, acc.shape)
        if tuning.pv_fp8:
          p_smem2.at[wg][...] = p.astype(p_dtype)
          plgpu.commit_smem()
        if tuning.schedule_barrier:
          plgpu.barrier_arrive(schedule)  # softmax done: hand the tensor cores over
        plgpu.barrier_wait(v_barriers.at[slot])
        if tuning.skew_pv:  # P V in the next step's tensor-core round trip
          return acc, m_new, l_i, p.astype(dtype)
        if tuning.schedule_barrier:
          plgpu.barrier_wait(schedule)
        acc = pl.run_state(functools.partial(pv, p, slot))(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_consumed.at[slot])
        return acc, m_new, l_i

      def kv_loop(carry, bounded):
        start = 0
        if tuning.skew_pv:  # block 0 has no P V before it (masked where causal: harmless if full)
          carry = kv_step(jnp.int32(0), carry, masked=causal, bounded=bounded, first=True)
          start = 1
        if causal:
          full_steps = lax.div(q_base, jnp.array(block_kv, jnp.int32))
          carry = lax.fori_loop(start, full_steps, functools.partial(
              kv_step, masked=False, bounded=bounded), carry)
          carry = lax.fori_loop(jnp.maximum(full_steps, start), kv_steps, functools.partial(
              kv_step, masked=True, bounded=bounded), carry)
        else:
          carry = lax.fori_loop(start, kv_steps, functools.partial(
              kv_step, masked=False, bounded=bounded), carry)
        if not tuning.skew_pv:
          return carry
        acc, m_i, l_i, p = carry
        last = lax.rem(kv_steps - 1, steps)
        acc = pl.run_state(functools.partial(pv, p, last))(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_consumed.at[last])
        return acc, m_i, l_i

      carry = (acc, m_i, l_i)
      pl.when(wg == 1)(rendezvous)  # offsets the two warpgroups by half an iteration
      if tuning.bounded_softmax:
        carry = lax.cond(use_bound > 0, functools.partial(kv_loop, bounded=True),
                         functools.partial(kv_loop, bounded=False), carry)
      else:
        carry = kv_loop(carry, bounded=False)
      if causal:
        @pl.loop(kv_steps, max_kv_steps)
        def _release(step):  # slots loaded for the other warpgroup's longer range
          slot = lax.rem(step, jnp.array(steps, step.dtype))
          plgpu.barrier_arrive(k_consumed.at[slot])
          plgpu.barrier_arrive(v_consumed.at[slot])
          rendezvous()
          rendezvous()
      pl.when(wg == 0)(rendezvous)
      acc, _, l_i = carry
      if tuning.pv_fp8:
        l_i = l_i / consts_smem[3]  # V's scale
      acc = acc / lax.broadcast_in_dim(l_i, acc.shape, [0])
      o_smem[...] = acc.astype(dtype)
      plgpu.commit_smem()
      pl.when(owns_rows)(lambda: plgpu.copy_smem_to_gmem(
          o_smem, out_ref.at[b, pl.ds(q_base, block_q), n]))
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _memory():
      plgpu.set_max_registers(_MEMORY_REGISTERS[wgs], action="decrease")

      def load(step, slot):
        kv = (b, pl.ds(step * block_kv, block_kv), n)
        plgpu.copy_gmem_to_smem(k_ref.at[kv], k_smem.at[slot], k_barriers.at[slot])
        if per_token:
          plgpu.copy_gmem_to_smem(vector_refs[2].at[b, n, pl.ds(step * block_kv, block_kv)],
                                  col_smem.at[slot], col_barriers.at[slot])
        if segmented:
          plgpu.copy_gmem_to_smem(seg_ref.at[b, pl.ds(step * block_kv, block_kv)],
                                  k_seg_smem.at[slot], seg_barriers.at[slot])
        v_src = (v_ref.at[b, n, :, pl.ds(step * block_kv, block_kv)] if tuning.pv_fp8
                 else v_ref.at[kv])
        plgpu.copy_gmem_to_smem(v_src, v_smem.at[slot], v_barriers.at[slot])

      for i in range(min(steps, num_kv_blocks)):  # static bound: slices are checked at trace time
        pl.when(i < max_kv_steps)(functools.partial(load, i, i))

      @pl.loop(0, max_kv_steps - steps)
      def _stream(step):
        slot = lax.rem(step, jnp.array(steps, step.dtype))
        plgpu.barrier_wait(k_consumed.at[slot])
        plgpu.barrier_wait(v_consumed.at[slot])
        load(step + steps, slot)

  def entry(q_ref, k_ref, v_ref, consts_ref, *rest):
    *rest, out_ref = rest
    seg_ref, vector_refs = (rest[0], rest[1:]) if segmented else (None, rest)
    qk_tf, v_tf = _smem_transforms(qk_dtype, head_dim), _smem_transforms(dtype, head_dim)
    p8_tf = _smem_transforms(jnp.float8_e4m3fn, block_kv)
    v_tile = (head_dim, block_kv) if tuning.pv_fp8 else (block_kv, head_dim)
    # Swizzled tiles first (each a multiple of 1 KiB, so every one stays swizzle-aligned), then the
    # f32 vectors (slots of multiples of 128 bytes).
    smem = (plgpu.SMEM((wgs, block_q, head_dim), qk_dtype, transforms=qk_tf),
            plgpu.SMEM((wgs, block_q, head_dim), dtype, transforms=v_tf),
            plgpu.SMEM((steps, block_kv, head_dim), qk_dtype, transforms=qk_tf),
            plgpu.SMEM((steps, *v_tile), v_in.dtype, transforms=p8_tf if tuning.pv_fp8 else v_tf),
            plgpu.SMEM((wgs, block_q, block_kv), p_dtype, transforms=p8_tf) if tuning.pv_fp8 else None,
            plgpu.SMEM((wgs, _CONSTS_WIDTH), jnp.float32),
            plgpu.SMEM((wgs, 2, block_q), jnp.float32) if per_token else None,
            plgpu.SMEM((steps, block_kv), jnp.float32) if per_token else None,
            plgpu.SMEM((wgs, block_q), jnp.int32) if segmented else None,
            plgpu.SMEM((steps, block_kv), jnp.int32) if segmented else None)
    barriers = (plgpu.Barrier(num_barriers=wgs * _Q_COPIES),
                *(plgpu.Barrier(num_barriers=steps) for _ in range(4)),  # K, V, column factors, ids
                *(plgpu.Barrier(num_arrivals=wgs, num_barriers=steps) for _ in range(2)),
                plgpu.Barrier(num_arrivals=2))
    pl.run_scoped(lambda smem_refs, barrier_refs: kernel(
        q_ref, k_ref, v_ref, consts_ref, seg_ref, vector_refs, out_ref, (smem_refs, barrier_refs)),
                  smem, barriers, collective_axes="wg")

  vector_args = () if vectors is None else vectors
  seg_args = (segments.astype(jnp.int32),) if segmented else ()
  out = plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), dtype),
      grid=(heads, pl.cdiv(q_len, cta_rows), batch),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q8, k8, v_in, consts, *seg_args, *vector_args)
  return out
