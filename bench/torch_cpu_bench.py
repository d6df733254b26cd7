"""PyTorch CPU reference for examples/cpu_bench.rs: forward + backward ms per batch for the seed
tutorial's simple, MNIST and CIFAR CNNs (the definitions of shared/bench/torch_baseline.py) at
batch 8 and 64, with torch.set_num_threads(THREADS). Prints the same CSV as the kiln example.

    python3 bench/torch_cpu_bench.py [threads] [iters]
"""
import sys, time, statistics, torch, torch.nn as nn

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
iters = int(sys.argv[2]) if len(sys.argv) > 2 else 20
torch.set_num_threads(threads)

def simple(c=3, h=32, n=10):
    return nn.Sequential(nn.Conv2d(c, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * (h - 4) ** 2, 64), nn.ReLU(), nn.Linear(64, n))

def mnist(c=1, h=28, n=10):
    return nn.Sequential(nn.Conv2d(c, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                         nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64 * (h - 8) ** 2, 128), nn.ReLU(),
                         nn.Dropout(0.5), nn.Linear(128, n))

def cifar(c=3, h=32, n=10):
    return nn.Sequential(nn.Conv2d(c, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                         nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Conv2d(64, 128, 3), nn.ReLU(), nn.Conv2d(128, 128, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(128 * (h - 12) ** 2, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, 256),
                         nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, n))

MODELS = {"simple": (simple, 3, 32), "mnist": (mnist, 1, 28), "cifar": (cifar, 3, 32)}
print("model,batch,threads,ms_fwd_bwd,images_per_s", flush=True)
for name, (fn, c, h) in MODELS.items():
    for batch in (8, 64):
        torch.manual_seed(0)
        m = fn(c, h).train()
        x = torch.randn(batch, c, h, h)
        dy = torch.full((batch, 10), 0.01)
        times = []
        for it in range(iters + 3):
            t = time.perf_counter()
            for p in m.parameters():
                p.grad = None
            m(x).backward(dy)
            if it >= 3:
                times.append((time.perf_counter() - t) * 1e3)
        ms = statistics.median(times)
        print(f"{name},{batch},{threads},{ms:.3f},{batch / ms * 1e3:.0f}", flush=True)
