"""Worker for tests/test_distributed.py, started by `torchrun --nproc_per_node=2`.

Exercises utils' distributed helpers under a real gloo process group and writes what it
saw to <out_dir>/rank<k>.json; the test process checks the values.
"""
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402


def main(out_dir):
    out_dir = Path(out_dir)
    args = SimpleNamespace(device="cpu", dist_url="env://")
    utils.init_distributed_mode(args)
    rank, world_size = utils.get_rank(), utils.get_world_size()
    result = {
        "args": {"distributed": args.distributed, "rank": args.rank,
                 "world_size": args.world_size, "gpu": args.gpu,
                 "dist_backend": args.dist_backend},
        "initialized": utils.is_dist_avail_and_initialized(),
        "rank": rank,
        "world_size": world_size,
        "is_main_process": utils.is_main_process(),
    }

    # concat_all_gather: values from every rank, in rank order, no graph.
    local = torch.tensor([[rank, rank + 0.5], [10.0 * rank, -rank]], requires_grad=True)
    gathered = utils.concat_all_gather(local)
    result["concat_all_gather"] = gathered.tolist()
    result["concat_all_gather_requires_grad"] = gathered.requires_grad

    # all_gather_with_grad: every rank's loss depends on every slice, differently per rank:
    #   loss_r = sum((r + 1) * g**2) + sum(W_r * g),  W_r = (r + 1) * arange(numel).view_as(g)
    x = (torch.arange(6.0).view(2, 3) + 10.0 * rank).requires_grad_()
    g = utils.all_gather_with_grad(x)
    weights = (rank + 1) * torch.arange(float(g.numel())).view_as(g)
    loss = ((rank + 1) * g ** 2).sum() + (weights * g).sum()
    loss.backward()
    result["all_gather_with_grad"] = g.tolist()
    result["all_gather_with_grad_requires_grad"] = g.requires_grad
    result["x"] = x.tolist()
    result["x_grad"] = x.grad.tolist()

    # all-reduce helpers (in place, returned).
    result["all_reduce_sum"] = utils.all_reduce_sum(torch.tensor([rank + 1.0, 2.0])).tolist()
    result["all_reduce_mean"] = utils.all_reduce_mean(torch.tensor([rank + 1.0, 2.0])).tolist()

    # SmoothedValue / MetricLogger: count and total summed over ranks.
    logger = utils.MetricLogger(delimiter="  ")
    for v in range(rank + 1):        # rank 0 logs [0], rank 1 logs [0, 1]
        logger.update(loss=float(v))
    logger.synchronize_between_processes()
    result["meter_count"] = logger.loss.count
    result["meter_total"] = logger.loss.total

    # barrier: rank 1 arrives late; after the barrier every rank must see its marker file.
    if rank == 1:
        time.sleep(0.5)
    (out_dir / f"marker{rank}").write_text("here")
    utils.barrier()
    result["markers_after_barrier"] = sorted(p.name for p in out_dir.glob("marker*"))

    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    utils.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
