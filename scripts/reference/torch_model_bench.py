"""PyTorch twin of medseg's HybridSegNet, for timing the same model step on CPU.

Mirrors src/model/ layer for layer (residual stem with bias-free convs + instance norm + LeakyReLU
0.01, patch-embedding conv, learned positions, pre-norm ViT blocks with GELU MLP, transposed-conv
decoder with two conv-norm-act fusions per level, 1x1 head) and prints the parameter count so it can
be checked against `medseg model`. Times forward and forward+backward (soft Dice + CE) at batch 1.

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
    /tmp/torchvenv/bin/python scripts/reference/torch_model_bench.py   # 2 threads, as on CI

TORCH_BENCH_DEVICE=cuda times it on the GPU instead (scripts/gpu-check.sh, beside medseg on wgpu).
"""
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(2)
DEVICE = torch.device(os.environ.get("TORCH_BENCH_DEVICE", "cpu"))


def sync():
    # GPU work is asynchronous: a step's time ends when its kernels have run.
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()

PRESETS = {
    "tiny": dict(widths=[8, 16, 32], embed=64, depth=2, heads=2, mlp=2),
    "small": dict(widths=[16, 32, 64], embed=192, depth=4, heads=3, mlp=4),
}


def conv(dims, cin, cout, k, stride=1, bias=True, pad=True):
    c = nn.Conv2d if dims == 2 else nn.Conv3d
    return c(cin, cout, k, stride=stride, padding=(k // 2 if pad else 0), bias=bias)


def up(dims, cin, cout, f):
    c = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
    return c(cin, cout, f, stride=f)


class CNA(nn.Module):
    def __init__(self, dims, cin, cout, k=3, stride=1):
        super().__init__()
        self.conv = conv(dims, cin, cout, k, stride, bias=False)
        self.norm = nn.GroupNorm(cout, cout)  # instance norm with affine, as burn's InstanceNorm

    def forward(self, x, act=True):
        y = self.norm(self.conv(x))
        return F.leaky_relu(y, 0.01) if act else y


class Residual(nn.Module):
    def __init__(self, dims, cin, cout, stride):
        super().__init__()
        self.first = CNA(dims, cin, cout, 3, stride)
        self.second = CNA(dims, cout, cout, 3, 1)
        self.shortcut = CNA(dims, cin, cout, 1, stride) if (cin != cout or stride != 1) else None

    def forward(self, x):
        skip = self.shortcut(x, act=False) if self.shortcut else x
        return F.leaky_relu(self.second(self.first(x), act=False) + skip, 0.01)


class Block(nn.Module):
    def __init__(self, e, heads, mlp):
        super().__init__()
        self.n1 = nn.LayerNorm(e, eps=1e-6)
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)
        self.n2 = nn.LayerNorm(e, eps=1e-6)
        self.fc1 = nn.Linear(e, e * mlp)
        self.fc2 = nn.Linear(e * mlp, e)

    def forward(self, x):
        h = self.n1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class Net(nn.Module):
    def __init__(self, dims, size, widths, embed, depth, heads, mlp, classes=2, patch=2):
        super().__init__()
        self.dims = dims
        self.stem = nn.ModuleList()
        cin = 1
        for i, w in enumerate(widths):
            self.stem.append(Residual(dims, cin, w, 2 if i > 0 else 1))
            cin = w
        stride = 2 ** (len(widths) - 1) * patch
        grid = 1
        for s in size:
            grid *= s // stride
        self.embed = conv(dims, cin, embed, patch, patch, pad=False)
        self.pos = nn.Parameter(torch.zeros(1, grid, embed))
        self.blocks = nn.ModuleList(Block(embed, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(embed, eps=1e-6)
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        c = embed
        for level in reversed(range(len(widths))):
            w = widths[level]
            self.ups.append(up(dims, c, w, patch if level == len(widths) - 1 else 2))
            self.fuse.append(nn.Sequential(CNA(dims, 2 * w, w), CNA(dims, w, w)))
            c = w
        self.head = conv(dims, c, classes, 1)

    def forward(self, x):
        skips = []
        for stage in self.stem:
            x = stage(x)
            skips.append(x)
        t = self.embed(x)
        shape = t.shape
        t = t.flatten(2).transpose(1, 2) + self.pos
        for b in self.blocks:
            t = b(t)
        x = self.norm(t).transpose(1, 2).reshape(shape)
        for up_, fuse, skip in zip(self.ups, self.fuse, reversed(skips)):
            x = fuse(torch.cat([up_(x), skip], 1))
        return self.head(x)


def dice_ce(logits, target):
    k = logits.shape[1]
    probs = logits.softmax(1)
    onehot = F.one_hot(target, k).movedim(-1, 1).float()
    dims = [0] + list(range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return (1 - dice).mean() + F.cross_entropy(logits, target)


def best_of(fn, n):
    fn()  # warm-up
    sync()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


if __name__ == "__main__":
    import sys

    # Optional filter: `torch_model_bench.py tiny 2 [STEPS]` times only that preset and
    # dimensionality, median of STEPS steps after one warm-up (as `medseg model --time`).
    only = sys.argv[1:3]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else None
    for name, p in PRESETS.items():
        for dims, size in [(2, [224, 224]), (3, [96, 96, 96])]:
            if only and (name != only[0] or (len(only) > 1 and str(dims) != only[1])):
                continue
            net = Net(dims, size, p["widths"], p["embed"], p["depth"], p["heads"], p["mlp"]).to(DEVICE)
            params = sum(q.numel() for q in net.parameters())
            x = torch.randn(1, 1, *size, device=DEVICE)
            y = torch.zeros(1, *size, dtype=torch.long, device=DEVICE)
            reps = steps or (5 if dims == 2 else 3)
            with torch.no_grad():
                fwd = best_of(lambda: net(x), reps)

            def step():
                net.zero_grad()
                dice_ce(net(x), y).backward()

            fb = best_of(step, reps)
            print(f"{name}/{dims}d params={params} forward={fwd*1000:.1f} ms  forward_backward={fb*1000:.1f} ms")
