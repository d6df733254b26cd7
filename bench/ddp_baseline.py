"""PyTorch DDP baseline for examples/dp_bench.rs: ResNet-18 (CIFAR stem, as kiln's zoo and
shared/bench/torch_baseline.py) training steps at a batch per GPU, one process per GPU under
torchrun, DistributedDataParallel with its defaults (25 MiB buckets, gradients all-reduced during
backward through NCCL). f32 with TF32 off, cudnn.benchmark, Adam, a fixed random batch per rank.

    torchrun --nproc-per-node 2 bench/ddp_baseline.py [--batch 256] [--model resnet18] [--device cpu]

Timing as dp_bench: 10 warm-up steps, then 5 groups of 20 steps (a barrier before each group,
synchronised after it), the median group's ms per step; rank 0 prints the same CSV columns:
impl,model,gpus,batch_per_gpu,ms_per_step,images_per_s,per_rank_ms. `--device cpu` uses gloo
(a smoke test on a machine without GPUs).
"""
import argparse, os, time
import torch, torch.nn as nn, torch.distributed as dist

# NVLink multicast stays off (KINDS.md): set before NCCL initialises, whatever the caller forgot.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def resnet18(n=10):
    import torchvision
    m = torchvision.models.resnet18(num_classes=n)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


def cifar(n=10):
    s = nn.Sequential
    return s(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
             nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Conv2d(64, 128, 3), nn.ReLU(), nn.Conv2d(128, 128, 3), nn.ReLU(),
             nn.Flatten(), nn.Linear(128 * 20 * 20, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, 256), nn.ReLU(),
             nn.Dropout(0.3), nn.Linear(256, n))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18", choices=["resnet18", "cifar"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--sync-bn", action="store_true")
    a = p.parse_args()
    cuda = a.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = (resnet18 if a.model == "resnet18" else cifar)().to(dev)
    if a.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = nn.parallel.DistributedDataParallel(model, device_ids=[local] if cuda else None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(a.batch, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(dev)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    for _ in range(10):
        step()
    sync()
    groups = []
    for _ in range(5):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(20):
            loss = step()
        sync()
        groups.append((time.perf_counter() - t0) * 1e3 / 20)
    assert torch.isfinite(loss).item(), loss
    groups.sort()
    ms = torch.zeros(world, dtype=torch.float64, device=dev)
    ms[rank] = groups[2]
    dist.all_reduce(ms)
    if rank == 0:
        slowest = ms.max().item()
        print("impl,model,gpus,batch_per_gpu,ms_per_step,images_per_s,per_rank_ms")
        print(f"torch_ddp,{a.model},{world},{a.batch},{slowest:.3f},{world * a.batch / slowest * 1e3:.0f},"
              + " ".join(f"{v:.3f}" for v in ms.tolist()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
