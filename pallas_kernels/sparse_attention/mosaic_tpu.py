"""Block-sparse flash attention, Pallas Mosaic TPU backend: GQA groups stacked, plans streamed per query tile.

Grid (B, K, Tb): one program per (sequence, KV group, query tile). The G query heads of the group are stacked
into one [G · q_block, H] tile, so each key block is read once for the whole group.

The plan reaches the kernel as a `TilePlan` (`tile_plan`, built from the BlockPlan by XLA): per (b, k, query
tile) the ascending list of the key blocks (or runs of `tile_blocks` consecutive blocks) any head of the group
visits, and per entry one int32 word whose bit h · tile_blocks + j says whether head h visits block j of the
entry. Only the per-row counts are scalar-prefetched; each program copies its own row of the plan from HBM
into SMEM when it starts (a 1M-token plan never has to fit in SMEM, only one query tile's row) and walks it
`gather` entries at a time: their K/V rows are DMA'd from HBM into one [~512 keys, H] VMEM tile (TPU matmuls
want wide tiles; gathering visited blocks reads nothing no head visits), double-buffered so the next tile's
copies run under the current tile's matmuls. Token masks (the head's blocks, causal, kv_len, sinks + window)
are computed in the kernel from iotas, never materialised; the online-softmax state is fp32 in VMEM.

Layouts: q head-major [B, N, T, H] (viewed as [B, K, G, T, H]) and k/v [B, K, S, H]; `api.py` transposes.
T must be a multiple of q_block and S of kv_block (`api.py` pads); S is padded here to whole entries (padded
keys lie past kv_len). Limits: G · tile_blocks <= 32 (G <= 32). The entry ids stream as two 16-bit ids per
int32 word when they fit (< 65536 entries); the head-bit words stay int32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import online_softmax
from pallas_kernels.block_plan import BlockPlan, cdiv, kernel_plan_args, pack_ascending
from pallas_kernels.tpu_dma import copy_in, entry_columns, walk_gathered


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TilePlan:
    """A BlockPlan regrouped per (sequence, KV group, query tile) over entries of `tile_blocks` blocks.

    tiles int32 [B, K, Tb, St]: ascending entry ids (key block // tile_blocks) any head of the group visits in
    the first `counts` entries, then repeats of the last (0 when empty); masks int32 [B, K, Tb, St]: bit
    h · tile_blocks + j set when head h of the group visits block j of the entry; counts int32 [B, K, Tb]."""

    tiles: jax.Array
    masks: jax.Array
    counts: jax.Array
    tile_blocks: int = dataclasses.field(metadata=dict(static=True))


def check_tile_blocks(group: int, tile_blocks: int) -> None:
    """Raise unless the group's G x tile_blocks head bits fit one int32 word."""
    if tile_blocks < 1 or group * tile_blocks > 32:
        raise ValueError(f"mosaic_tpu: G x tile_blocks must be in 1..32 (one mask word per plan entry), got "
                         f"G={group}, tile_blocks={tile_blocks}")


def tile_plan(plan: BlockPlan, num_kv_heads: int, num_kv_blocks: int, tile_blocks: int) -> TilePlan:
    """The TilePlan of `plan` (N query heads in num_kv_heads groups, keys in num_kv_blocks blocks)."""
    b, n, tb, m = plan.kv_blocks.shape
    g = n // num_kv_heads
    st = cdiv(num_kv_blocks, tile_blocks)
    blk = plan.kv_blocks
    valid = jnp.arange(m) < plan.counts[..., None]  # [B, N, Tb, M]
    head = (jnp.arange(n, dtype=jnp.int32) % g)[None, :, None, None]
    bit = jnp.left_shift(jnp.int32(1), head * tile_blocks + blk % tile_blocks)  # distinct per (head, block)
    bi, ni, ti = jnp.meshgrid(jnp.arange(b), jnp.arange(n), jnp.arange(tb), indexing="ij")
    words = jnp.zeros((b, num_kv_heads, tb, st), jnp.int32).at[
        bi[..., None], (ni // g)[..., None], ti[..., None], blk // tile_blocks].add(jnp.where(valid, bit, 0))
    active = words != 0  # adding distinct powers of two never carries: add == or
    tiles, counts = pack_ascending(active, st)
    masks = jnp.where(jnp.arange(st) < counts[..., None], jnp.take_along_axis(words, tiles, axis=-1), 0)
    return TilePlan(tiles=tiles, masks=masks, counts=counts, tile_blocks=tile_blocks)


def _kernel(counts_ref, sinks_ref, window_ref, kvlen_ref, qstart_ref, tiles_hbm, masks_hbm, q_ref, k_hbm, v_hbm,
            o_ref, lse_ref, tiles_sm, masks_sm, k_buf, v_buf, sem, plan_sem, m_sc, l_sc, acc_sc, *, scale,
            q_block, kv_block, tile_blocks, gather, g, num_kv, num_tiles, packed):
    b, kg, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = (b * num_kv + kg) * num_tiles + t
    count = counts_ref[row]
    kt = tile_blocks * kv_block  # keys per plan entry
    width = gather * kt  # keys per K/V tile in VMEM: `gather` entries
    rows = g * q_block
    h = q_ref.shape[-1]
    # this query tile's row of the plan: HBM -> SMEM (the whole plan never sits in SMEM)
    if packed:  # two 16-bit tile ids per int32 word: entry e in word e // 2, low half first
        tile_of = lambda e: lax.bitwise_and(lax.shift_right_logical(tiles_sm[lax.div(e, 2)], 16 * lax.rem(e, 2)),
                                            0xFFFF)
    else:
        tile_of = lambda e: tiles_sm[e]
    copy_in(pltpu.make_async_copy(tiles_hbm.at[row], tiles_sm, plan_sem.at[0]),
            pltpu.make_async_copy(masks_hbm.at[row], masks_sm, plan_sem.at[1]))
    online_softmax.init_scratch(m_sc, l_sc, acc_sc)
    first_key = lambda e: tile_of(e) * kt

    r_iota = lax.broadcasted_iota(jnp.int32, (rows, width), 0)
    c_iota = lax.broadcasted_iota(jnp.int32, (rows, width), 1)
    head = lax.div(r_iota, jnp.int32(q_block))  # lax.div / rem: no sign op on TPU
    q_pos = qstart_ref[b] + t * q_block + lax.rem(r_iota, jnp.int32(q_block))
    bit = head * tile_blocks + lax.div(lax.rem(c_iota, jnp.int32(kt)), jnp.int32(kv_block))
    sink = jnp.zeros((rows, width), jnp.int32)
    window = jnp.zeros((rows, width), jnp.int32)
    for hi in range(g):  # per-row band of the stacked heads
        sink = jnp.where(head == hi, sinks_ref[kg * g + hi], sink)
        window = jnp.where(head == hi, window_ref[kg * g + hi], window)
    q = q_ref[...].reshape(rows, h)

    def visit(slot, entries):
        k, v = k_buf[slot], v_buf[slot]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        k_pos, word = entry_columns((rows, width), kt, entries, first_key, lambda e: masks_sm[e])
        use = lax.bitwise_and(lax.shift_right_logical(word, bit), 1) != 0
        vis = use & (k_pos <= q_pos) & (k_pos < kvlen_ref[b]) & ((k_pos < sink) | (q_pos - k_pos < window))
        online_softmax.step_scratch(s, vis, v, m_sc, l_sc, acc_sc)

    walk_gathered(count, gather, kt, first_key, k_hbm.at[b, kg], v_hbm.at[b, kg], k_buf, v_buf, sem, visit)
    online_softmax.finish_scratch(m_sc, l_sc, acc_sc, o_ref, lse_ref)


@functools.partial(jax.jit, static_argnames=("interpret", "tile_keys", "tile_blocks", "pack_tiles"))
def block_sparse_attention_tpu(q_hm, k_hm, v_hm, plan: BlockPlan, *, scale=None, interpret=False, o_init=None,
                               tile_keys: int = 512, tile_blocks: int = 1, pack_tiles: bool | None = None):
    """Head-major q [B, N, T, H], k/v [B, K, S, H] -> out [B, N, T, H] (q.dtype), lse fp32 [B, N, T, 1].

    tile_blocks: plan blocks per list entry (1: the union of blocks itself, nothing read that no head visits;
    more: runs of consecutive blocks, fewer entries). tile_keys: keys per K/V tile in VMEM (entries gathered
    per matmul: tile_keys / (tile_blocks x kv_block)). pack_tiles: stream entry ids as 16-bit pairs (None:
    when they fit). o_init: optional [B, N, T, H] buffer aliased to the output (tests pass NaNs to catch
    unwritten rows).
    """
    b, n, t, h = q_hm.shape
    kh, s = k_hm.shape[1], k_hm.shape[2]
    bq, bk = plan.q_block, plan.kv_block
    _, counts, sinks, window, kv_len, q_start = kernel_plan_args(plan, t, s)  # checks whole blocks
    g, tb = n // kh, t // bq
    check_tile_blocks(g, tile_blocks)
    tbk = tile_blocks
    kt = tbk * bk
    ng = max(1, tile_keys // kt)  # entries gathered per K/V tile
    sp = cdiv(s, kt) * kt
    k_hm, v_hm = (jnp.pad(x, ((0, 0), (0, 0), (0, sp - s), (0, 0))) for x in (k_hm, v_hm))
    tp = tile_plan(plan, kh, s // bk, tbk)
    st = tp.tiles.shape[-1]
    tiles = tp.tiles.reshape(-1, st)
    packed = st < (1 << 16) if pack_tiles is None else pack_tiles  # int16 pairs when ids fit: half the bytes
    if packed:
        tiles = jnp.pad(tiles, ((0, 0), (0, st % 2)))
        tiles = lax.bitwise_or(tiles[:, 0::2], lax.shift_left(tiles[:, 1::2], 16))
    scale = h ** -0.5 if scale is None else scale
    q5 = q_hm.reshape(b, kh, g, t, h)
    prefetch = (tp.counts.reshape(-1), sinks, window, kv_len, q_start)
    q_map = lambda bi, ki, ti, *_: (bi, ki, 0, ti, 0)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    in_specs = [hbm, hbm, pl.BlockSpec((None, None, g, bq, h), q_map), hbm, hbm]
    extra, aliases = (), {}
    if o_init is not None:  # aliased output buffer, never read
        in_specs.append(hbm)
        extra, aliases = (o_init.reshape(b, kh, g, t, h),), {len(prefetch) + 5: 0}
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=(b, kh, tb), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, g, bq, h), q_map), pl.BlockSpec((None, None, g, bq, 1), q_map)],
        scratch_shapes=[pltpu.SMEM((tiles.shape[-1],), jnp.int32), pltpu.SMEM((st,), jnp.int32),
                        pltpu.VMEM((2, ng * kt, h), k_hm.dtype), pltpu.VMEM((2, ng * kt, h), v_hm.dtype),
                        pltpu.SemaphoreType.DMA((2, 2)), pltpu.SemaphoreType.DMA((2,)),
                        pltpu.VMEM((g * bq, 1), jnp.float32), pltpu.VMEM((g * bq, 1), jnp.float32),
                        pltpu.VMEM((g * bq, h), jnp.float32)])
    kernel = functools.partial(_kernel, scale=scale, q_block=bq, kv_block=bk, tile_blocks=tbk, gather=ng, g=g,
                               num_kv=kh, num_tiles=tb, packed=packed)
    if o_init is not None:
        inner = kernel
        n_in = len(prefetch) + 5
        kernel = lambda *refs: inner(*refs[:n_in], *refs[n_in + 1:])  # drop the aliased buffer's input ref
    out, lse = pl.pallas_call(
        kernel, grid_spec=grid_spec, input_output_aliases=aliases,
        out_shape=[jax.ShapeDtypeStruct((b, kh, g, t, h), q_hm.dtype),
                   jax.ShapeDtypeStruct((b, kh, g, t, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False, name="rtpurbo_block_sparse_attention_tpu",
    )(*prefetch, tiles, tp.masks.reshape(-1, st), q5, k_hm, v_hm, *extra)
    return out.reshape(b, n, t, h), lse.reshape(b, n, t, 1)
