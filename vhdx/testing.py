"""Hypothesis strategies for VHDX chains: random geometry and random write sets, as fixture specs.

A drawn ``ChainSpec`` is built with ``vhdx_fixtures.builder.build`` (or the ``vhdx_chain`` pytest fixture),
and its ``ChainModel`` says what every layer must read::

    from hypothesis import given
    from vhdx.testing import chain_specs

    @given(spec=chain_specs(max_layers=3))
    def test_reader_matches_model(spec, tmp_path_factory):
        result = build(spec, tmp_path_factory.mktemp("chain"))
        ...

Writes lean towards the awkward cases: block and sector edges, unaligned offsets and lengths, whole
blocks (for ZERO/UNMAPPED states), overlapping writes within and across layers.

Needs hypothesis (a test dependency); nothing in the library imports this module.
"""

from __future__ import annotations

from hypothesis import strategies as st

from vhdx_fixtures.spec import BASE, PATTERNS, ChainSpec, DiskSpec, LayerSpec, Write

MiB = 1 << 20
BLOCK_SIZES = (1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB, 32 * MiB)


@st.composite
def disk_specs(draw, max_size: int = 16 * MiB, types=("dynamic", "fixed")) -> DiskSpec:
    """A base disk: type, block size, sector sizes and a virtual size (a multiple of the logical sector)."""
    logical = draw(st.sampled_from((512, 4096)))
    physical = draw(st.sampled_from((512, 4096)))
    block_size = draw(st.sampled_from(BLOCK_SIZES))
    sectors = draw(st.integers(min_value=1, max_value=max_size // logical))
    # Sizes that end on a block edge are common on real disks; keep them likely.
    whole_blocks = sectors * logical // block_size
    if whole_blocks and draw(st.booleans()):
        sectors = whole_blocks * block_size // logical
    return DiskSpec(size=sectors * logical, type=draw(st.sampled_from(types)), block_size=block_size,
                    logical_sector_size=logical, physical_sector_size=physical)


@st.composite
def writes(draw, size: int, block_size: int, patterns=PATTERNS, max_writes: int = 6) -> tuple[Write, ...]:
    """Up to ``max_writes`` writes inside a disk of ``size`` bytes."""
    out = []
    for _ in range(draw(st.integers(min_value=0, max_value=max_writes))):
        edges = list(range(0, size, block_size))[1:] or [0]
        kind = draw(st.sampled_from(("anywhere", "edge", "block")))
        if kind == "edge":
            edge = draw(st.sampled_from(edges))
            offset = max(0, edge - draw(st.integers(min_value=0, max_value=8192)))
        elif kind == "block":
            offset = draw(st.sampled_from([0, *edges])) if edges != [0] else 0
        else:
            offset = draw(st.integers(min_value=0, max_value=size - 1))
        room = size - offset
        if kind == "block":
            length = min(room, block_size * draw(st.integers(min_value=1, max_value=2)))
        else:
            length = draw(st.integers(min_value=1, max_value=min(room, 3 * block_size // 2)))
        pattern = draw(st.sampled_from(patterns))
        byte = draw(st.integers(min_value=1, max_value=255)) if pattern == "constant" else 0
        out.append(Write(offset, length, pattern, byte))
    return tuple(out)


@st.composite
def chain_specs(draw, max_layers: int = 3, max_size: int = 16 * MiB, max_writes: int = 5, branches: bool = True,
                mixed_block_sizes: bool = True, patterns=PATTERNS) -> ChainSpec:
    """A base disk plus up to ``max_layers`` checkpoints (sometimes branching), each with random writes."""
    base = draw(disk_specs(max_size=max_size))
    layers = [LayerSpec(BASE, None, base.block_size,
                        draw(writes(base.size, base.block_size, patterns, max_writes)))]
    for i in range(draw(st.integers(min_value=0, max_value=max_layers))):
        parent = layers[-1].name
        if branches and len(layers) > 1 and draw(st.booleans()):
            parent = draw(st.sampled_from([layer.name for layer in layers]))
        block_size = layers[[x.name for x in layers].index(parent)].block_size
        if mixed_block_sizes and draw(st.booleans()):
            block_size = draw(st.sampled_from(BLOCK_SIZES))
        layers.append(LayerSpec(f"snap{i + 1}", parent, block_size,
                                draw(writes(base.size, block_size, patterns, max_writes))))
    return ChainSpec(name="drawn", base=base, layers=tuple(layers), seed=draw(st.integers(0, 2**31)))
