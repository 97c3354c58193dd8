"""Under torchrun (gloo, CPU): the gradient norm and clipping of FSDP2's sharded gradients, computed from
each rank's shards with one all-reduce, equal torch's clip_grad_norm_ on the same DTensors. Prints
'rank R: same norm N, same clipped shards' or fails with an AssertionError."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from dtrain.optim import grad_norm_and_clip, shards_on_their_mesh


def sharded_model_with_grads(seed: int) -> nn.Module:
    torch.manual_seed(0)  # same weights on every rank
    model = nn.Sequential(nn.Linear(7, 13), nn.LayerNorm(13), nn.Linear(13, 5), nn.Linear(5, 3))  # 5 rows: uneven
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    torch.manual_seed(seed + dist.get_rank())  # each rank its own batch
    model(torch.randn(6, 7)).square().sum().backward()
    return model


def main() -> None:
    dist.init_process_group("gloo")
    ours, theirs = sharded_model_with_grads(1), sharded_model_with_grads(1)
    grads = [p.grad for p in ours.parameters()]
    assert shards_on_their_mesh(grads) is not None  # the path under test, not torch's
    norm = grad_norm_and_clip(grads, max_norm=0.5)
    torch_norm = nn.utils.clip_grad_norm_(list(theirs.parameters()), max_norm=0.5).full_tensor()
    torch.testing.assert_close(norm, torch_norm)
    assert float(norm) > 0.5  # so clipping did scale the gradients
    for mine, p in zip(grads, theirs.parameters()):
        torch.testing.assert_close(mine.to_local(), p.grad.to_local())
    print(f"rank {dist.get_rank()}: same norm {float(norm):.6f}, same clipped shards", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
