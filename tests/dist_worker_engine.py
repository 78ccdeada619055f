"""torchrun worker for tests/test_engine.py: DDP wrapping keeps buffers equal across ranks."""
import argparse
import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402
from engine import training


class WithQueue(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.register_buffer('queue', torch.randn(4, 8))  # random per rank, as BLIP's queues

    def forward(self, x):
        return self.linear(x)


args = argparse.Namespace(device='cpu')
utils.init_distributed_mode(args)
torch.manual_seed(utils.get_rank())                  # each rank builds different values
model, _ = training.wrap_model(WithQueue(), args)
model(torch.randn(2, 4)).sum().backward()
queues = [torch.empty(4, 8) for _ in range(utils.get_world_size())]
dist.all_gather(queues, model.module.queue)
weights = [torch.empty(4, 4) for _ in range(utils.get_world_size())]
dist.all_gather(weights, model.module.linear.weight.detach().contiguous())
if utils.is_main_process():
    with open(sys.argv[1], 'w') as f:
        json.dump({'queues_equal': all(torch.equal(q, queues[0]) for q in queues),
                   'weights_equal': all(torch.equal(w, weights[0]) for w in weights)}, f)
# DDP's reducer goes before the process group, and both ranks leave together: a reducer
# outliving its group, or a rank tearing gloo down while the other still writes its result,
# made a rank abort now and then ("terminate called without an active exception", ~1 run in 20)
del model
gc.collect()
dist.barrier()
dist.destroy_process_group()
