"""The process mesh's rank layout (TP fastest, then DP, then PP; EP blocks of the stage-local
ranks), computed without creating process groups."""
import pytest

from megads.parallel.mesh import Mesh, layout_ranks

LAYOUTS = {
    # world 8 = PP 2 x DP 2 x TP 2, EP 2: rank = pp * 4 + dp * 2 + tp
    (8, 2, 2, 2): {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "mp": [[0, 1, 4, 5], [2, 3, 6, 7]],
        "stage": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "ep": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "edp": [[0, 2], [1, 3], [4, 6], [5, 7]],
    },
    # world 8 = DP 4 x TP 2, EP 4: an EP block spans two DP replicas, so EP differs from TP
    (8, 2, 1, 4): {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "dp": [[0, 2, 4, 6], [1, 3, 5, 7]],
        "pp": [[0], [1], [2], [3], [4], [5], [6], [7]],
        "mp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "stage": [[0, 1, 2, 3, 4, 5, 6, 7]],
        "ep": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "edp": [[0, 4], [1, 5], [2, 6], [3, 7]],
    },
}


@pytest.mark.parametrize("world_size, tp, pp, ep", LAYOUTS, ids=["pp2xdp2xtp2-ep2", "dp4xtp2-ep4"])
def test_layout_ranks(world_size, tp, pp, ep):
    groups = layout_ranks(world_size, tp, pp, ep)
    assert groups == LAYOUTS[world_size, tp, pp, ep]
    # Each rank's coordinates are its positions in its groups.
    dp = world_size // (tp * pp)
    for rank in range(world_size):
        mesh = Mesh(world_size, rank, tp=tp, pp=pp, dp=dp, ep=ep)
        for name, index in (("tp", mesh.tp_rank), ("dp", mesh.dp_rank), ("pp", mesh.pp_rank), ("ep", mesh.ep_rank),
                            ("edp", mesh.edp_rank)):
            group = next(g for g in groups[name] if rank in g)
            assert group.index(rank) == index, (name, rank)
